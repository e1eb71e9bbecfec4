"""Deliver one signed webhook (Standard Webhooks: webhook-id, -timestamp, -signature).

During a secret rotation the client holds two secrets for a while; every delivery
then carries one signature per valid secret in ``webhook-signature``
(space-separated ``v1,<base64>`` entries, as the spec allows), so a receiver that
still has the old secret verifies as well as one that has the new.

The target is checked again before every attempt (``activities.url_safety``) and
the request goes to the address that was checked, never to a fresh DNS answer;
redirects are not followed, so a 3xx is a failed delivery.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import httpx
from standardwebhooks import Webhook

from activities.url_safety import (
    CheckedTarget,
    Resolver,
    UnsafeWebhookUrl,
    check_webhook_url,
    system_resolver,
)


class WebhookDeliveryError(Exception):
    """The receiver did not take the event; retrying later may succeed."""


class WebhookTargetRefused(WebhookDeliveryError):
    """The URL (or what its name resolves to now) is not a public address.

    Retrying is still right: the client may fix its URL or its DNS, and every
    attempt reads the URL afresh.
    """


def signature_header(secrets: Sequence[str], event_id: str, at: datetime, body: str) -> str:
    """One ``v1,<signature>`` per secret, space-separated, newest secret first."""
    if isinstance(secrets, str):
        raise TypeError("pass a sequence of secrets, not one string")
    if not secrets:
        raise ValueError("a webhook needs at least one signing secret")
    return " ".join(Webhook(secret).sign(event_id, at, body) for secret in secrets)


def _pinned_request_url(target: CheckedTarget, address: str) -> httpx.URL:
    return httpx.URL(target.url).copy_with(host=address)


class WebhookSender:
    def __init__(
        self,
        http: httpx.AsyncClient,
        *,
        allow_loopback: bool = False,
        resolver: Resolver = system_resolver,
    ) -> None:
        self._http = http
        self._allow_loopback = allow_loopback
        self._resolver = resolver

    async def send(
        self, *, url: str, secrets: Sequence[str], event_id: str, event: dict[str, Any]
    ) -> int:
        body = json.dumps(event, separators=(",", ":"), sort_keys=True)
        now = datetime.now(UTC)
        try:
            target = await check_webhook_url(
                url, allow_loopback=self._allow_loopback, resolver=self._resolver
            )
        except UnsafeWebhookUrl as exc:
            raise WebhookTargetRefused(f"webhook URL refused: {exc}") from exc
        headers = {
            "content-type": "application/json",
            "webhook-id": event_id,
            "webhook-timestamp": str(int(now.timestamp())),
            "webhook-signature": signature_header(secrets, event_id, now, body),
            # The URL names the checked address, so Host carries the name; no
            # keep-alive, so a connection verified for one name never serves another.
            "host": httpx.URL(url).netloc.decode("ascii"),
            "connection": "close",
        }
        extensions = {"sni_hostname": target.host} if target.scheme == "https" else {}
        last_error: httpx.HTTPError | None = None
        for address in target.addresses:
            request = self._http.build_request(
                "POST",
                _pinned_request_url(target, str(address)),
                content=body,
                headers=headers,
                extensions=extensions,
            )
            try:
                # stream=True: only the status matters; a receiver's body is never read.
                response = await self._http.send(request, stream=True, follow_redirects=False)
            except httpx.ConnectError as exc:
                last_error = exc  # try the name's next address
                continue
            except httpx.HTTPError as exc:
                raise WebhookDeliveryError(
                    f"{type(exc).__name__} posting to the webhook URL"
                ) from exc
            await response.aclose()
            if not 200 <= response.status_code < 300:
                raise WebhookDeliveryError(f"webhook receiver answered {response.status_code}")
            return response.status_code
        raise WebhookDeliveryError(
            f"{type(last_error).__name__} posting to the webhook URL"
        ) from last_error
