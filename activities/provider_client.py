"""The product's adapter to the payment provider (the sandbox locally; Stripe-shaped).

One small exception family, translated here from httpx exceptions and HTTP
statuses, so nothing above this module knows about HTTP. Nothing here logs:
requests carry card tokens and the API key.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

import httpx

# Raised before a single byte of the request left: the provider cannot have acted.
_NEVER_SENT = (
    httpx.ConnectError,
    httpx.ConnectTimeout,
    httpx.PoolTimeout,
    httpx.UnsupportedProtocol,
)


class ProviderError(Exception):
    """Base of everything the provider adapter raises."""


class ProviderDeclined(ProviderError):
    """The provider refused the charge: a business outcome, never retried."""

    def __init__(
        self, code: str, decline_code: str | None, message: str, *, charge_id: str | None = None
    ) -> None:
        super().__init__(message)
        self.code = code
        self.decline_code = decline_code
        self.message = message
        # Stripe records a declined attempt as a failed charge; support may look it up.
        self.charge_id = charge_id


class ProviderInvalidRequest(ProviderError):
    """The request can never succeed as it is: unknown payment method, an over-refund,
    an idempotency key reused with other parameters. Never retried."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class ProviderUnavailable(ProviderError):
    """Infrastructure trouble; retrying with the same idempotency key is safe.

    ``outcome_unknown`` is True when the request may have reached the provider and
    moved money: only a lookup by idempotency key (or a retry) can then tell.
    """

    def __init__(self, message: str, *, outcome_unknown: bool) -> None:
        super().__init__(message)
        self.outcome_unknown = outcome_unknown


@dataclass(frozen=True)
class ProviderCharge:
    id: str
    amount: int
    currency: str  # ISO 4217, upper case as everywhere in the product
    status: str  # "succeeded" or "failed"
    amount_refunded: int = 0
    failure_code: str | None = None


@dataclass(frozen=True)
class ProviderRefund:
    id: str
    charge_id: str
    amount: int
    currency: str
    status: str


class ProviderClient:
    """An injected ``http`` client is used as is for its pool and transport; the base
    URL, key and timeout given here still apply to every request, and it is the
    caller's to close."""

    def __init__(
        self,
        base_url: str,
        api_key: str,
        timeout_seconds: float,
        http: httpx.AsyncClient | None = None,
    ) -> None:
        self._base_url = base_url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {api_key}"}
        self._timeout = httpx.Timeout(timeout_seconds)
        self._owns_http = http is None
        self._http = http or httpx.AsyncClient(
            limits=httpx.Limits(max_connections=200, max_keepalive_connections=50)
        )

    def __repr__(self) -> str:
        return f"ProviderClient({self._base_url!r})"

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._owns_http:
            await self._http.aclose()

    async def charge(
        self,
        *,
        idempotency_key: str,
        amount: int,
        currency: str,
        payment_method: str,
        description: str | None = None,
    ) -> ProviderCharge:
        body: dict[str, Any] = {
            "amount": amount,
            "currency": currency.lower(),
            "payment_method": payment_method,
        }
        if description is not None:
            body["description"] = description
        data = await self._request(
            "POST", "/v1/charges", json=body, idempotency_key=idempotency_key
        )
        return _charge(data, outcome_unknown=True)

    async def find_charge(self, idempotency_key: str) -> ProviderCharge | None:
        """The charge made under this key, if any: how a lost answer is resolved."""
        data = await self._request(
            "GET", "/v1/charges", params={"idempotency_key": idempotency_key}
        )
        found = data.get("data")
        if not isinstance(found, list):
            raise ProviderUnavailable(
                "malformed charge list from the provider", outcome_unknown=False
            )
        return _charge(found[0], outcome_unknown=False) if found else None

    async def refund(self, *, idempotency_key: str, charge_id: str, amount: int) -> ProviderRefund:
        data = await self._request(
            "POST",
            "/v1/refunds",
            json={"charge": charge_id, "amount": amount},
            idempotency_key=idempotency_key,
        )
        try:
            return ProviderRefund(
                id=str(data["id"]),
                charge_id=str(data["charge"]),
                amount=int(data["amount"]),
                currency=str(data["currency"]).upper(),
                status=str(data["status"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ProviderUnavailable(
                "malformed refund from the provider", outcome_unknown=True
            ) from exc

    async def _request(
        self,
        method: str,
        path: str,
        *,
        json: dict[str, Any] | None = None,
        params: dict[str, str] | None = None,
        idempotency_key: str | None = None,
    ) -> dict[str, Any]:
        # Only a POST can move money; a failed read leaves nothing unknown behind.
        may_have_acted = method == "POST"
        headers = dict(self._headers)
        if idempotency_key is not None:
            headers["Idempotency-Key"] = idempotency_key
        try:
            response = await self._http.request(
                method,
                self._base_url + path,
                json=json,
                params=params,
                headers=headers,
                timeout=self._timeout,
            )
        except _NEVER_SENT as exc:
            raise ProviderUnavailable(
                f"cannot reach the provider ({type(exc).__name__})", outcome_unknown=False
            ) from exc
        except httpx.HTTPError as exc:
            # Sent, or partly sent: a read timeout or a reset may follow a committed charge.
            raise ProviderUnavailable(
                f"no answer from the provider ({type(exc).__name__})",
                outcome_unknown=may_have_acted,
            ) from exc

        status = response.status_code
        # 409: Stripe's answer while another request with the same key is in flight.
        if status >= 500 or status in (409, 429):
            raise ProviderUnavailable(f"provider answered {status}", outcome_unknown=may_have_acted)
        if status in (401, 403):
            # Our credentials are wrong: nothing happened, and retrying is right once an
            # operator fixes the configuration, rather than failing every payment for good.
            raise ProviderUnavailable(
                f"provider refused our credentials ({status})", outcome_unknown=False
            )
        try:
            data = response.json()
        except ValueError as exc:  # not JSON, or not UTF-8
            raise ProviderUnavailable(
                f"malformed answer from the provider ({status})", outcome_unknown=may_have_acted
            ) from exc
        if not isinstance(data, dict):
            raise ProviderUnavailable(
                f"malformed answer from the provider ({status})", outcome_unknown=may_have_acted
            )
        if status < 400:
            return data

        error = data.get("error")
        if not isinstance(error, dict):
            error = {}
        # Stripe's idempotency errors come without a code; their type says it all.
        code = str(error.get("code") or error.get("type") or "unknown")
        message = str(error.get("message") or f"provider answered {status}")
        if status == 402:
            decline_code = error.get("decline_code")
            charge_id = error.get("charge")
            raise ProviderDeclined(
                code,
                None if decline_code is None else str(decline_code),
                message,
                charge_id=None if charge_id is None else str(charge_id),
            )
        raise ProviderInvalidRequest(code, message)


def _charge(data: Any, *, outcome_unknown: bool) -> ProviderCharge:
    try:
        failure_code = data.get("failure_code")
        return ProviderCharge(
            id=str(data["id"]),
            amount=int(data["amount"]),
            currency=str(data["currency"]).upper(),
            status=str(data["status"]),
            amount_refunded=int(data.get("amount_refunded") or 0),
            failure_code=None if failure_code is None else str(failure_code),
        )
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        raise ProviderUnavailable(
            "malformed charge from the provider", outcome_unknown=outcome_unknown
        ) from exc
