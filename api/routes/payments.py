"""``/v1/payments``: create (idempotent) and read."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Header, Response, status

from api.dependencies import CurrentClient, PaymentServiceDep, SettingsDep
from api.idempotency import parse_idempotency_key
from api.problems import payment_not_found
from api.schemas import PaymentCreate, PaymentOut, ProblemOut

router = APIRouter(prefix="/v1/payments", tags=["payments"])

_PROBLEM = {"model": ProblemOut, "content": {"application/problem+json": {}}}


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=PaymentOut,
    responses={
        201: {"description": "The payment reached its outcome (succeeded or failed)."},
        202: {"model": PaymentOut, "description": "Accepted; still processing."},
        400: {**_PROBLEM, "description": "Invalid body or Idempotency-Key."},
        401: {**_PROBLEM, "description": "Missing or invalid API key."},
        422: {**_PROBLEM, "description": "Idempotency-Key reused with a different body."},
        503: {**_PROBLEM, "description": "Temporarily unavailable; retry with the same key."},
    },
)
async def create_payment(
    body: PaymentCreate,
    response: Response,
    client: CurrentClient,
    payments: PaymentServiceDep,
    settings: SettingsDep,
    idempotency_key: Annotated[
        str | None,
        Header(
            alias="Idempotency-Key",
            description="A unique key per payment (use a UUID). Retries with the same key "
            "return the same payment and never charge twice.",
        ),
    ] = None,
) -> Any:
    key = parse_idempotency_key(idempotency_key)
    answer = await payments.create(
        client_id=client.client_id,
        client_name=client.name,
        key=key,
        request=body.to_domain(),
        wait_seconds=settings.api_wait_seconds,
    )
    payment = answer.payment
    response.status_code = (
        status.HTTP_201_CREATED if payment.status.is_terminal else status.HTTP_202_ACCEPTED
    )
    response.headers["Location"] = f"/v1/payments/{payment.id}"
    if answer.replayed:
        response.headers["Idempotent-Replayed"] = "true"
    return PaymentOut.from_domain(payment)


@router.get(
    "/{payment_id}",
    response_model=PaymentOut,
    responses={401: _PROBLEM, 404: _PROBLEM, 503: _PROBLEM},
)
async def get_payment(
    payment_id: str, client: CurrentClient, payments: PaymentServiceDep
) -> PaymentOut:
    payment = await payments.get(client.client_id, payment_id)
    if payment is None:
        raise payment_not_found()
    return PaymentOut.from_domain(payment)
