"""The sandbox provider's HTTP API, shaped like Stripe's charges and refunds."""

from __future__ import annotations

import hashlib
import hmac
import json
import random
import secrets
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Annotated, Any, TypeVar

import structlog
from fastapi import APIRouter, Depends, FastAPI, Header, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from sandbox_provider import payment_methods
from sandbox_provider.errors import SandboxError, error_body, invalid_request
from sandbox_provider.faults import AfterCommit, FaultInjector, Faults
from sandbox_provider.store import Charge, Refund, SandboxStore, Scope, StoredResponse

log = structlog.get_logger(__name__)

# Stripe's limits: keys up to 255 characters, amounts up to eight digits.
MAX_IDEMPOTENCY_KEY_LENGTH = 255
MAX_AMOUNT = 99_999_999

ParamsT = TypeVar("ParamsT", bound=BaseModel)

Amount = Annotated[int, Field(gt=0, le=MAX_AMOUNT, strict=True)]


class ChargeParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    amount: Amount
    currency: Annotated[str, Field(pattern=r"^[A-Za-z]{3}$"), AfterValidator(str.lower)]
    payment_method: str = Field(min_length=1)
    description: str | None = Field(default=None, max_length=1000)


class RefundParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    charge: str = Field(min_length=1)
    amount: Amount | None = None


@dataclass(frozen=True)
class Answer:
    status_code: int
    body: str
    replayed: bool = False
    # True when this request created the charge or refund: only then do the
    # after-commit faults apply, and only then is there something to log.
    committed: bool = False


async def require_idempotency_key(
    idempotency_key: Annotated[str, Header(alias="Idempotency-Key")] = "",
) -> str:
    if not idempotency_key:
        raise invalid_request(
            "idempotency_key_required", "This sandbox requires an Idempotency-Key header."
        )
    if len(idempotency_key) > MAX_IDEMPOTENCY_KEY_LENGTH:
        raise invalid_request(
            "idempotency_key_too_long",
            f"Idempotency-Key must be at most {MAX_IDEMPOTENCY_KEY_LENGTH} characters.",
        )
    return idempotency_key


IdempotencyKey = Annotated[str, Depends(require_idempotency_key)]


def create_app(db_path: str | None, api_key: str, seed: int | None = None) -> FastAPI:
    store = SandboxStore(db_path)
    faults = FaultInjector(random.Random(seed))  # noqa: S311 - fault dice, not secrets

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        try:
            yield
        finally:
            store.close()

    async def require_api_key(authorization: Annotated[str, Header()] = "") -> None:
        scheme, _, presented = authorization.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            presented.encode(), api_key.encode()
        ):
            raise SandboxError(
                401,
                "invalid_request_error",
                "api_key_invalid",
                "Invalid API key: send 'Authorization: Bearer <key>'.",
            )

    async def admit(scope: Scope, idempotency_key: str) -> None:
        """Count the request, then play the faults that come before any work."""
        store.record_request(scope, idempotency_key)
        await faults.delay()
        if faults.fail_before(scope):
            raise SandboxError(
                500, "api_error", "internal_error", "Sandbox fault: an internal error occurred."
            )

    async def deliver(answer: Answer, scope: Scope) -> Response:
        if answer.replayed:
            return _json(answer.status_code, answer.body, {"Idempotent-Replayed": "true"})
        if answer.committed:
            after = faults.after_commit(scope)
            if after is AfterCommit.HANG:
                await faults.hang()
            elif after is AfterCommit.MALFORMED:
                return Response(b"<html>502 Bad Gateway", status_code=200, media_type="text/html")
        return _json(answer.status_code, answer.body)

    # Synchronous on purpose: nothing awaits inside the transaction, so no other request
    # with the same key can run between the look-up of its stored answer and the write.
    def create_charge_once(params: ChargeParams, key: str) -> Answer:
        fingerprint = _fingerprint(params)
        with store.transaction() as tx:
            if (earlier := tx.stored_response("charge", key)) is not None:
                return _replay_or_conflict(earlier, fingerprint, key)
            if not payment_methods.is_known(params.payment_method):
                # Stored like any answer from an endpoint that started executing, as Stripe
                # does: a retry with the same key gets the same refusal.
                answer = _error_answer(
                    invalid_request(
                        "resource_missing", "No such PaymentMethod.", param="payment_method"
                    )
                )
                tx.save_response("charge", key, fingerprint, answer.status_code, answer.body)
                return answer
            decline = payment_methods.DECLINING.get(params.payment_method)
            charge = Charge(
                id=_new_id("ch"),
                idempotency_key=key,
                amount=params.amount,
                currency=params.currency,
                payment_method=params.payment_method,
                description=params.description,
                status="failed" if decline else "succeeded",
                failure_code=decline.decline_code if decline else None,
                amount_refunded=0,
                created=int(time.time()),
            )
            if decline is None:
                status_code, body = 200, charge.to_api()
            else:
                status_code = 402
                body = error_body(
                    "card_error",
                    decline.code,
                    decline.message,
                    decline_code=decline.decline_code,
                    charge=charge.id,
                )
            answer = Answer(status_code, _render(body), committed=True)
            tx.insert_charge(charge)
            tx.save_response("charge", key, fingerprint, answer.status_code, answer.body)
        log.info(
            "sandbox.charge_created",
            charge_id=charge.id,
            idempotency_key=key,
            amount=charge.amount,
            currency=charge.currency,
            status=charge.status,
            failure_code=charge.failure_code,
        )
        return answer

    def create_refund_once(params: RefundParams, key: str) -> Answer:
        fingerprint = _fingerprint(params)
        with store.transaction() as tx:
            if (earlier := tx.stored_response("refund", key)) is not None:
                return _replay_or_conflict(earlier, fingerprint, key)
            charge = tx.charge(params.charge)
            refund: Refund | None = None
            if charge is None:
                refused = invalid_request("resource_missing", "No such charge.", param="charge")
            elif charge.status != "succeeded":
                refused = invalid_request(
                    "charge_not_refundable",
                    "This charge did not succeed, so there is nothing to refund.",
                    param="charge",
                )
            else:
                remaining = charge.amount - charge.amount_refunded
                amount = remaining if params.amount is None else params.amount
                if amount == 0 or amount > remaining:
                    refused = invalid_request(
                        "amount_too_large",
                        f"Refund amount ({amount}) is greater than the unrefunded amount "
                        f"on the charge ({remaining}).",
                        param="amount",
                    )
                else:
                    refund = Refund(
                        id=_new_id("re"),
                        charge_id=charge.id,
                        idempotency_key=key,
                        amount=amount,
                        currency=charge.currency,
                        status="succeeded",
                        created=int(time.time()),
                    )
            if refund is None:
                answer = _error_answer(refused)
            else:
                tx.insert_refund(refund)
                answer = Answer(200, _render(refund.to_api()), committed=True)
            tx.save_response("refund", key, fingerprint, answer.status_code, answer.body)
        if refund is not None:
            log.info(
                "sandbox.refund_created",
                refund_id=refund.id,
                charge_id=refund.charge_id,
                idempotency_key=key,
                amount=refund.amount,
            )
        return answer

    app = FastAPI(title="Sandbox payment provider", lifespan=lifespan)

    @app.exception_handler(SandboxError)
    async def render_sandbox_error(_request: Request, exc: SandboxError) -> Response:
        return JSONResponse(exc.body, status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def render_validation_error(_request: Request, exc: RequestValidationError) -> Response:
        error = _invalid_parameters(exc.errors())
        return JSONResponse(error.body, status_code=error.status_code)

    @app.exception_handler(StarletteHTTPException)
    async def render_http_error(_request: Request, exc: StarletteHTTPException) -> Response:
        code = "resource_missing" if exc.status_code == 404 else "request_invalid"
        return JSONResponse(
            error_body("invalid_request_error", code, str(exc.detail)),
            status_code=exc.status_code,
            headers=exc.headers,
        )

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)])

    @v1.post("/charges")
    async def create_charge(request: Request, idempotency_key: IdempotencyKey) -> Response:
        await admit("charge", idempotency_key)
        # Parsed here rather than by FastAPI so that a request with a bad body is still
        # counted as received, and refused in Stripe's error shape.
        params = _parse(ChargeParams, await request.body())
        return await deliver(create_charge_once(params, idempotency_key), "charge")

    @v1.get("/charges/{charge_id}")
    async def get_charge(charge_id: str) -> dict[str, Any]:
        charge = store.charge(charge_id)
        if charge is None:
            raise SandboxError(404, "invalid_request_error", "resource_missing", "No such charge.")
        return charge.to_api()

    @v1.get("/charges")
    async def find_charges(idempotency_key: str) -> dict[str, Any]:
        """Stripe has no such filter; ours lets a caller whose answer was lost find it."""
        charge = store.charge_by_key(idempotency_key)
        return {"object": "list", "data": [] if charge is None else [charge.to_api()]}

    @v1.post("/refunds")
    async def create_refund(request: Request, idempotency_key: IdempotencyKey) -> Response:
        await admit("refund", idempotency_key)
        params = _parse(RefundParams, await request.body())
        return await deliver(create_refund_once(params, idempotency_key), "refund")

    sandbox = APIRouter(prefix="/sandbox", dependencies=[Depends(require_api_key)])

    @sandbox.get("/stats")
    async def stats() -> dict[str, Any]:
        return store.stats()

    @sandbox.get("/ledger")
    async def ledger() -> dict[str, Any]:
        """Every charge and refund (read-only): what ``python -m audit`` reconciles."""
        charges, refunds = store.listing()
        return {
            "charges": [charge.to_api() for charge in charges],
            "refunds": [refund.to_api() for refund in refunds],
        }

    @sandbox.get("/faults")
    async def get_faults() -> Faults:
        return faults.config

    @sandbox.put("/faults")
    async def put_faults(config: Faults) -> Faults:
        faults.config = config
        log.info("sandbox.faults_set", **config.model_dump(exclude_defaults=True))
        return faults.config

    @sandbox.delete("/faults")
    async def clear_faults() -> Faults:
        faults.reset()
        return faults.config

    @sandbox.post("/reset")
    async def reset() -> dict[str, str]:
        store.reset()
        faults.reset()
        log.info("sandbox.reset")
        return {"status": "reset"}

    app.include_router(v1)
    app.include_router(sandbox)
    return app


def _new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(12)}"


def _render(body: dict[str, Any]) -> str:
    return json.dumps(body, separators=(",", ":"))


def _json(status_code: int, body: str, headers: dict[str, str] | None = None) -> Response:
    return Response(body, status_code=status_code, media_type="application/json", headers=headers)


def _fingerprint(params: BaseModel) -> str:
    # The same digest as the first release, so stored answers in an old data file still match.
    return hashlib.sha256(json.dumps(params.model_dump(), sort_keys=True).encode()).hexdigest()


def _error_answer(error: SandboxError) -> Answer:
    return Answer(error.status_code, _render(error.body))


def _replay_or_conflict(earlier: StoredResponse, fingerprint: str, key: str) -> Answer:
    if earlier.fingerprint == fingerprint:
        return Answer(earlier.status_code, earlier.body, replayed=True)
    log.info("sandbox.idempotency_conflict", idempotency_key=key)
    return _error_answer(
        SandboxError(
            400,
            "idempotency_error",
            "idempotency_key_reused",
            "Keys for idempotent requests can only be used with the same parameters "
            "they were first used with.",
        )
    )


def _parse(model: type[ParamsT], raw: bytes) -> ParamsT:
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        raise _invalid_parameters(exc.errors()) from None


def _invalid_parameters(errors: Sequence[Any]) -> SandboxError:
    first = errors[0]
    where = {"body", "query", "header", "path"}
    param = ".".join(str(part) for part in first["loc"] if part not in where) or None
    code = {"missing": "parameter_missing", "extra_forbidden": "parameter_unknown"}.get(
        first["type"], "parameter_invalid"
    )
    message = f"{param}: {first['msg']}" if param else str(first["msg"])
    return invalid_request(code, message, param=param)
