"""``/v1/payments/{id}/refunds``: create (idempotent) and read."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Header, Response, status

from api.dependencies import CurrentClient, SettingsDep
from api.idempotency import parse_idempotency_key
from api.openapi import BODY_PROBLEMS, COMMON_PROBLEMS, RATE_LIMIT_HEADERS, problem_responses
from api.problems import Problem
from api.refunds import RefundServiceDep
from api.schemas import RefundCreate, RefundOut

router = APIRouter(prefix="/v1/payments", tags=["refunds"])


@router.post(
    "/{payment_id}/refunds",
    status_code=status.HTTP_201_CREATED,
    response_model=RefundOut,
    responses={
        201: {
            "description": "The refund reached its outcome (succeeded or failed).",
            "headers": RATE_LIMIT_HEADERS,
        },
        202: {
            "model": RefundOut,
            "description": "Accepted; the refund is still pending.",
            "headers": RATE_LIMIT_HEADERS,
        },
        **problem_responses(
            *BODY_PROBLEMS,
            "idempotency-key-missing",
            "idempotency-key-invalid",
            "payment-not-found",
            "payment-not-refundable",
            "refund-exceeds-refundable",
            "idempotency-key-reused",
            *COMMON_PROBLEMS,
        ),
    },
)
async def create_refund(
    payment_id: str,
    response: Response,
    client: CurrentClient,
    refunds: RefundServiceDep,
    settings: SettingsDep,
    body: Annotated[RefundCreate | None, Body()] = None,
    idempotency_key: Annotated[
        str | None,
        Header(
            alias="Idempotency-Key",
            description="A unique key per refund (use a UUID). Retries with the same key "
            "return the same refund and never refund twice.",
        ),
    ] = None,
) -> Any:
    key = parse_idempotency_key(idempotency_key)
    request = (body or RefundCreate()).to_domain(payment_id)
    answer = await refunds.create(
        client_id=client.client_id,
        client_name=client.name,
        key=key,
        request=request,
        wait_seconds=settings.api_wait_seconds,
    )
    refund = answer.refund
    response.status_code = (
        status.HTTP_201_CREATED if refund.status.is_terminal else status.HTTP_202_ACCEPTED
    )
    response.headers["Location"] = f"/v1/payments/{refund.payment_id}/refunds/{refund.id}"
    if answer.replayed:
        response.headers["Idempotent-Replayed"] = "true"
    return RefundOut.from_domain(refund)


@router.get(
    "/{payment_id}/refunds/{refund_id}",
    response_model=RefundOut,
    responses={
        200: {"description": "The refund, current state.", "headers": RATE_LIMIT_HEADERS},
        **problem_responses("refund-not-found", *COMMON_PROBLEMS),
    },
)
async def get_refund(
    payment_id: str, refund_id: str, client: CurrentClient, refunds: RefundServiceDep
) -> RefundOut:
    refund = await refunds.get(client.client_id, payment_id, refund_id)
    if refund is None:
        raise Problem(404, "refund-not-found", "Refund not found", "No such refund.")
    return RefundOut.from_domain(refund)
