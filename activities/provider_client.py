"""The product's adapter to the payment provider (the sandbox locally).

One small exception family, translated here from httpx exceptions and HTTP
statuses, so nothing above this module knows about HTTP.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import httpx


class ProviderError(Exception):
    """Base of everything the provider adapter raises."""


class ProviderDeclined(ProviderError):
    """The provider refused the charge: a business outcome, never retried."""

    def __init__(self, code: str, decline_code: str | None, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.decline_code = decline_code
        self.message = message


class ProviderInvalidRequest(ProviderError):
    """The request can never succeed as it is (unknown payment method, over-refund, ...)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class ProviderUnavailable(ProviderError):
    """Infrastructure trouble; retrying may succeed.

    ``outcome_unknown`` is True when the request may have reached the provider and
    moved money: only the provider can then say what happened.
    """

    def __init__(self, message: str, *, outcome_unknown: bool) -> None:
        super().__init__(message)
        self.outcome_unknown = outcome_unknown


@dataclass(frozen=True)
class ProviderCharge:
    id: str
    amount: int
    currency: str
    status: str
    amount_refunded: int = 0
    failure_code: str | None = None


@dataclass(frozen=True)
class ProviderRefund:
    id: str
    charge_id: str
    amount: int
    status: str


class ProviderClient:
    def __init__(
        self,
        base_url: str,
        api_key: str,
        timeout_seconds: float,
        http: httpx.AsyncClient | None = None,
    ) -> None:
        self._http = http or httpx.AsyncClient(
            base_url=base_url,
            timeout=timeout_seconds,
            headers={"Authorization": f"Bearer {api_key}"},
            limits=httpx.Limits(max_connections=200, max_keepalive_connections=50),
        )

    async def aclose(self) -> None:
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
            "POST", "/v1/charges", json=body, headers={"Idempotency-Key": idempotency_key}
        )
        return _charge(data)

    async def find_charge(self, idempotency_key: str) -> ProviderCharge | None:
        data = await self._request(
            "GET", "/v1/charges", params={"idempotency_key": idempotency_key}
        )
        found = data.get("data") or []
        return _charge(found[0]) if found else None

    async def refund(self, *, idempotency_key: str, charge_id: str, amount: int) -> ProviderRefund:
        data = await self._request(
            "POST",
            "/v1/refunds",
            json={"charge": charge_id, "amount": amount},
            headers={"Idempotency-Key": idempotency_key},
        )
        try:
            return ProviderRefund(
                id=str(data["id"]),
                charge_id=str(data["charge"]),
                amount=int(data["amount"]),
                status=str(data["status"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ProviderUnavailable("malformed refund", outcome_unknown=True) from exc

    async def _request(
        self,
        method: str,
        path: str,
        *,
        json: dict[str, Any] | None = None,
        params: dict[str, str] | None = None,
        headers: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        try:
            response = await self._http.request(
                method, path, json=json, params=params, headers=headers
            )
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            # Never reached the provider: nothing can have been charged.
            raise ProviderUnavailable(
                f"cannot connect to the provider ({type(exc).__name__})", outcome_unknown=False
            ) from exc
        except httpx.HTTPError as exc:
            raise ProviderUnavailable(
                f"no answer from the provider ({type(exc).__name__})", outcome_unknown=True
            ) from exc

        if response.status_code >= 500 or response.status_code == 429:
            raise ProviderUnavailable(
                f"provider answered {response.status_code}", outcome_unknown=True
            )
        try:
            data = response.json()
        except ValueError as exc:
            raise ProviderUnavailable(
                f"malformed provider answer ({response.status_code})", outcome_unknown=True
            ) from exc
        if not isinstance(data, dict):
            raise ProviderUnavailable("malformed provider answer", outcome_unknown=True)
        if response.status_code < 400:
            return data

        error = data.get("error") if isinstance(data.get("error"), dict) else {}
        assert isinstance(error, dict)
        code = str(error.get("code") or "unknown")
        message = str(error.get("message") or f"provider answered {response.status_code}")
        if response.status_code == 402:
            decline = error.get("decline_code")
            raise ProviderDeclined(code, None if decline is None else str(decline), message)
        if response.status_code in (401, 403):
            # Our own configuration is wrong: retrying is right once an operator fixes it.
            raise ProviderUnavailable(
                f"provider refused our credentials: {message}", outcome_unknown=False
            )
        raise ProviderInvalidRequest(code, message)


def _charge(data: dict[str, Any]) -> ProviderCharge:
    try:
        return ProviderCharge(
            id=str(data["id"]),
            amount=int(data["amount"]),
            currency=str(data["currency"]).upper(),
            status=str(data["status"]),
            amount_refunded=int(data.get("amount_refunded", 0)),
            failure_code=None if data.get("failure_code") is None else str(data["failure_code"]),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ProviderUnavailable(
            "malformed charge from the provider", outcome_unknown=True
        ) from exc
