"""The sandbox provider's HTTP API (Stripe-shaped)."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import random
import secrets
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import FastAPI, Header, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from sandbox_provider.store import SandboxStore

# Test payment methods, named like Stripe's: token → (code, decline_code) of the decline.
DECLINES: dict[str, tuple[str, str]] = {
    "pm_card_chargeDeclined": ("card_declined", "generic_decline"),
    "pm_card_chargeDeclinedInsufficientFunds": ("card_declined", "insufficient_funds"),
    "pm_card_chargeDeclinedExpiredCard": ("expired_card", "expired_card"),
    "pm_card_chargeDeclinedProcessingError": ("processing_error", "processing_error"),
}
SUCCEEDS = {"pm_card_visa", "pm_card_mastercard"}
_DECLINE_MESSAGES = {
    "generic_decline": "Your card was declined.",
    "insufficient_funds": "Your card has insufficient funds.",
    "expired_card": "Your card has expired.",
    "processing_error": "An error occurred while processing your card. Try again in a little bit.",
}


class ChargeBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    amount: int = Field(gt=0)
    currency: str = Field(pattern=r"^[A-Za-z]{3}$")
    payment_method: str = Field(min_length=1)
    description: str | None = None


class RefundBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    charge: str
    amount: int | None = Field(default=None, gt=0)


class Faults(BaseModel):
    """What goes wrong, on demand. Applies to POST /v1/charges and POST /v1/refunds."""

    model_config = ConfigDict(extra="forbid")
    latency_ms: int = Field(default=0, ge=0)
    error_rate: float = Field(default=0.0, ge=0, le=1)
    fail_next: int = Field(default=0, ge=0)
    timeout_after_charge_rate: float = Field(default=0.0, ge=0, le=1)
    timeout_after_charge_next: int = Field(default=0, ge=0)
    hang_seconds: float = Field(default=30.0, ge=0)
    malformed_after_charge_next: int = Field(default=0, ge=0)
    malformed_after_charge_rate: float = Field(default=0.0, ge=0, le=1)


def _error(status: int, type_: str, code: str, message: str, **extra: Any) -> JSONResponse:
    return JSONResponse(
        {"error": {"type": type_, "code": code, "message": message, **extra}}, status_code=status
    )


def _fingerprint(payload: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _replay(status_code: int, body: dict[str, Any]) -> JSONResponse:
    return JSONResponse(body, status_code=status_code, headers={"Idempotent-Replayed": "true"})


class FaultInjector:
    def __init__(self, rng: random.Random) -> None:
        self.config = Faults()
        self._rng = rng

    def _take(self, counter: str, rate: float) -> bool:
        remaining = getattr(self.config, counter)
        if remaining > 0:
            self.config = self.config.model_copy(update={counter: remaining - 1})
            return True
        return rate > 0 and self._rng.random() < rate

    async def before(self) -> JSONResponse | None:
        if self.config.latency_ms:
            await asyncio.sleep(self.config.latency_ms / 1000)
        if self._take("fail_next", self.config.error_rate):
            return _error(500, "api_error", "internal_error", "Sandbox fault: internal error.")
        return None

    async def after_commit(self) -> Response | None:
        if self._take("timeout_after_charge_next", self.config.timeout_after_charge_rate):
            await asyncio.sleep(self.config.hang_seconds)
        if self._take("malformed_after_charge_next", self.config.malformed_after_charge_rate):
            return Response(b"<html>502 Bad Gateway", status_code=200, media_type="text/html")
        return None


def create_app(db_path: str | None, api_key: str, seed: int | None = None) -> FastAPI:
    store = SandboxStore(db_path)
    faults = FaultInjector(random.Random(seed))  # noqa: S311 - fault dice, not secrets
    # Serialise work per idempotency key (and per charge for refunds): no double effects.
    key_locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        store.close()

    app = FastAPI(title="Sandbox payment provider", lifespan=lifespan)

    @app.middleware("http")
    async def authenticate(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        if request.url.path.startswith(("/v1/", "/sandbox/")):
            scheme, _, presented = request.headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(presented, api_key):
                return _error(401, "invalid_request_error", "unauthorized", "Invalid API key.")
        return await call_next(request)

    async def admit(scope: str, idempotency_key: str | None) -> Response | None:
        """Refuse a request without a key, count it, and play any injected fault."""
        if not idempotency_key:
            return _error(
                400,
                "invalid_request_error",
                "idempotency_key_required",
                f"This sandbox requires an Idempotency-Key on every {scope}.",
            )
        store.count_request(scope, idempotency_key)
        return await faults.before()

    def replay_or_conflict(scope: str, idempotency_key: str, fingerprint: str) -> Response | None:
        """The stored answer for a key used before, or a refusal if the parameters differ."""
        stored = store.stored_response(scope, idempotency_key)
        if stored is None:
            return None
        if stored.fingerprint != fingerprint:
            return _error(
                400,
                "idempotency_error",
                "idempotency_key_reused",
                "Keys for idempotent requests can only be used with the same "
                "parameters they were first used with.",
            )
        return _replay(stored.status_code, stored.body)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/v1/charges")
    async def create_charge(
        body: ChargeBody,
        idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key")] = None,
    ) -> Response:
        if (refused := await admit("charge", idempotency_key)) is not None:
            return refused
        assert idempotency_key is not None
        params = body.model_dump()
        params["currency"] = params["currency"].lower()
        fingerprint = _fingerprint(params)
        async with key_locks[idempotency_key]:
            if earlier := replay_or_conflict("charge", idempotency_key, fingerprint):
                return earlier
            if body.payment_method not in SUCCEEDS and body.payment_method not in DECLINES:
                response_body = {
                    "error": {
                        "type": "invalid_request_error",
                        "code": "resource_missing",
                        "message": f"No such PaymentMethod: '{body.payment_method}'",
                    }
                }
                store.store_response("charge", idempotency_key, fingerprint, 400, response_body)
                return JSONResponse(response_body, status_code=400)
            declined = DECLINES.get(body.payment_method)
            charge = {
                "id": "ch_" + secrets.token_hex(12),
                "idempotency_key": idempotency_key,
                "amount": body.amount,
                "currency": params["currency"],
                "payment_method": body.payment_method,
                "description": body.description,
                "status": "failed" if declined else "succeeded",
                "failure_code": declined[1] if declined else None,
                "created": int(time.time()),
            }
            if declined:
                code, decline_code = declined
                status_code = 402
                response_body = {
                    "error": {
                        "type": "card_error",
                        "code": code,
                        "decline_code": decline_code,
                        "message": _DECLINE_MESSAGES[decline_code],
                        "charge": charge["id"],
                    }
                }
            else:
                status_code = 200
                response_body = _charge_object({**charge, "amount_refunded": 0})
            store.insert_charge(charge, fingerprint, status_code, response_body)
        if (injected_after := await faults.after_commit()) is not None:
            return injected_after
        return JSONResponse(response_body, status_code=status_code)

    @app.get("/v1/charges/{charge_id}")
    async def get_charge(charge_id: str) -> Response:
        charge = store.charge(charge_id)
        if charge is None:
            return _error(
                404, "invalid_request_error", "resource_missing", f"No such charge: '{charge_id}'"
            )
        return JSONResponse(_charge_object(charge))

    @app.get("/v1/charges")
    async def list_charges(idempotency_key: str) -> dict[str, Any]:
        charge = store.charge_by_key(idempotency_key)
        return {"object": "list", "data": [] if charge is None else [_charge_object(charge)]}

    @app.post("/v1/refunds")
    async def create_refund(
        body: RefundBody,
        idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key")] = None,
    ) -> Response:
        if (refused := await admit("refund", idempotency_key)) is not None:
            return refused
        assert idempotency_key is not None
        fingerprint = _fingerprint(body.model_dump())
        # One lock per charge: concurrent refunds of a charge can never exceed it.
        async with key_locks["refund:" + body.charge]:
            if earlier := replay_or_conflict("refund", idempotency_key, fingerprint):
                return earlier
            charge = store.charge(body.charge)
            if charge is None:
                return _error(
                    400,
                    "invalid_request_error",
                    "resource_missing",
                    f"No such charge: '{body.charge}'",
                )
            if charge["status"] != "succeeded":
                return _error(
                    400,
                    "invalid_request_error",
                    "charge_not_refundable",
                    "This charge did not succeed and cannot be refunded.",
                )
            remaining = charge["amount"] - charge["amount_refunded"]
            amount = body.amount if body.amount is not None else remaining
            if amount <= 0 or amount > remaining:
                return _error(
                    400,
                    "invalid_request_error",
                    "amount_too_large",
                    f"Refund amount ({amount}) is greater than the unrefunded "
                    f"amount on the charge ({remaining}).",
                )
            refund = {
                "id": "re_" + secrets.token_hex(12),
                "charge_id": charge["id"],
                "idempotency_key": idempotency_key,
                "amount": amount,
                "currency": charge["currency"],
                "status": "succeeded",
                "created": int(time.time()),
            }
            response_body = {
                "id": refund["id"],
                "object": "refund",
                "charge": refund["charge_id"],
                "amount": amount,
                "currency": refund["currency"],
                "status": "succeeded",
                "idempotency_key": idempotency_key,
                "created": refund["created"],
            }
            store.insert_refund(refund, fingerprint, response_body)
        if (injected_after := await faults.after_commit()) is not None:
            return injected_after
        return JSONResponse(response_body)

    @app.get("/sandbox/stats")
    async def stats() -> dict[str, Any]:
        return store.stats()

    @app.get("/sandbox/faults")
    async def get_faults() -> Faults:
        return faults.config

    @app.put("/sandbox/faults")
    async def put_faults(config: Faults) -> Faults:
        faults.config = config
        return faults.config

    @app.delete("/sandbox/faults")
    async def clear_faults() -> Faults:
        faults.config = Faults()
        return faults.config

    @app.post("/sandbox/reset")
    async def reset() -> dict[str, str]:
        store.reset()
        faults.config = Faults()
        return {"status": "reset"}

    return app


def _charge_object(charge: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": charge["id"],
        "object": "charge",
        "amount": charge["amount"],
        "currency": charge["currency"],
        "status": charge["status"],
        "payment_method": charge["payment_method"],
        "description": charge.get("description"),
        "idempotency_key": charge["idempotency_key"],
        "amount_refunded": charge.get("amount_refunded", 0),
        "failure_code": charge.get("failure_code"),
        "created": charge["created"],
    }
