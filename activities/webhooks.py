"""Deliver one signed webhook (Standard Webhooks: webhook-id, -timestamp, -signature)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import httpx
from standardwebhooks import Webhook


class WebhookDeliveryError(Exception):
    """The receiver did not take the event; retrying later may succeed."""


class WebhookSender:
    def __init__(self, http: httpx.AsyncClient) -> None:
        self._http = http

    async def send(self, *, url: str, secret: str, event_id: str, event: dict[str, Any]) -> int:
        body = json.dumps(event, separators=(",", ":"), sort_keys=True)
        now = datetime.now(UTC)
        headers = {
            "content-type": "application/json",
            "webhook-id": event_id,
            "webhook-timestamp": str(int(now.timestamp())),
            "webhook-signature": Webhook(secret).sign(event_id, now, body),
        }
        try:
            response = await self._http.post(url, content=body, headers=headers)
        except httpx.HTTPError as exc:
            raise WebhookDeliveryError(f"{type(exc).__name__} posting to the webhook URL") from exc
        if not 200 <= response.status_code < 300:
            raise WebhookDeliveryError(f"webhook receiver answered {response.status_code}")
        return response.status_code
