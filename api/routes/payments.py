"""``/v1/payments``: create (idempotent), list and read."""

from __future__ import annotations

import time
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request, Response, status

from api.admission import board_claim, wait_after_line
from api.arrival import arrived_at
from api.dependencies import CurrentClient, PaymentServiceDep, SettingsDep
from api.idempotency import parse_idempotency_key
from api.openapi import BODY_PROBLEMS, COMMON_PROBLEMS, RATE_LIMIT_HEADERS, problem_responses
from api.preferences import applied_wait, requested_wait
from api.problems import FieldError, payment_not_found, validation_problem
from api.schemas import PaymentCreate, PaymentList, PaymentOut
from domain.payments import PaymentStatus
from ledger.repositories import UnknownCursor

router = APIRouter(prefix="/v1/payments", tags=["payments"])

_PAYMENT_HEADERS: dict[str, Any] = {
    "Location": {"description": "`/v1/payments/{id}`", "schema": {"type": "string"}},
    "Idempotent-Replayed": {
        "description": "`true` when this answer is a replay of an earlier request with the "
        "same Idempotency-Key (same payment, current state).",
        "schema": {"type": "string", "enum": ["true"]},
    },
    "Preference-Applied": {
        "description": "`wait=N`: the wait applied, when the request sent `Prefer: wait`.",
        "schema": {"type": "string"},
    },
    **RATE_LIMIT_HEADERS,
}


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=PaymentOut,
    summary="Create a payment (idempotent)",
    responses={
        201: {
            "description": "The payment reached its outcome: `succeeded`, or `failed` with a "
            "`failure_code` (a decline is not an error).",
            "headers": _PAYMENT_HEADERS,
        },
        202: {
            "model": PaymentOut,
            "description": "Accepted, still `processing`: the wait ran out, or this is a repeat "
            "of a payment in flight (repeats answer at once unless they send `Prefer: wait`). "
            "Read it back at `Location` or wait for the webhook.",
            "headers": _PAYMENT_HEADERS,
        },
        **problem_responses(
            *BODY_PROBLEMS,
            "idempotency-key-missing",
            "idempotency-key-invalid",
            "idempotency-key-unusable",
            "idempotency-request-in-progress",
            "idempotency-key-reused",
            *COMMON_PROBLEMS,
            "payments-backlog-full",
        ),
    },
)
async def create_payment(
    body: PaymentCreate,
    request: Request,
    response: Response,
    client: CurrentClient,
    payments: PaymentServiceDep,
    settings: SettingsDep,
    idempotency_key: Annotated[
        str | None,
        Header(
            alias="Idempotency-Key",
            description="Required. A unique key per payment (use a UUID; never personal data), "
            '1-255 printable ASCII characters, bare or quoted (`"…"`). Retries with the same '
            "key return the same payment and never charge twice.",
        ),
    ] = None,
    prefer: Annotated[
        str | None,
        Header(
            alias="Prefer",
            description="`wait=N` (RFC 7240): wait up to N seconds for the outcome instead of "
            "the default (PAYMENTS_API_WAIT_SECONDS, 5; for a repeat of a payment in flight, "
            "no wait), at least 1 and at most PAYMENTS_API_MAX_WAIT_SECONDS (30). Answered "
            "with `Preference-Applied`.",
        ),
    ] = None,
) -> Any:
    key = parse_idempotency_key(idempotency_key)
    if body.amount > settings.api_max_amount:
        raise validation_problem(
            [
                FieldError(
                    "amount", f"Input should be less than or equal to {settings.api_max_amount}"
                )
            ]
        )
    requested = requested_wait(prefer)
    wait_seconds = applied_wait(
        requested, default=settings.api_wait_seconds, cap=settings.api_max_wait_seconds
    )
    # Preference-Applied names the wait asked for; the time in line counts against it.
    left = wait_after_line(request.scope, wait_seconds)
    answer = await payments.create(
        client_id=client.client_id,
        client_name=client.name,
        key=key,
        request=body.to_domain(),
        wait_seconds=left,
        # A repeat answers the payment as it stands unless the client asked to wait.
        replay_wait_seconds=left if requested is not None else 0.0,
        arrived_seconds=time.perf_counter() - arrived_at(request.scope),
        claim=board_claim(request.scope),
    )
    payment = answer.payment
    response.status_code = (
        status.HTTP_201_CREATED if payment.status.is_terminal else status.HTTP_202_ACCEPTED
    )
    response.headers["Location"] = f"/v1/payments/{payment.id}"
    if answer.replayed:
        response.headers["Idempotent-Replayed"] = "true"
    if requested is not None:
        response.headers["Preference-Applied"] = f"wait={int(wait_seconds)}"
    return PaymentOut.from_domain(payment)


@router.get(
    "",
    response_model=PaymentList,
    summary="List your payments, newest first",
    responses={
        200: {"description": "One page of payments.", "headers": RATE_LIMIT_HEADERS},
        **problem_responses("validation-error", *COMMON_PROBLEMS),
    },
)
async def list_payments(
    client: CurrentClient,
    payments: PaymentServiceDep,
    limit: Annotated[int, Query(ge=1, le=100, description="Page size, 1-100.")] = 10,
    starting_after: Annotated[
        str | None,
        Query(
            max_length=64,
            pattern=r"^[\x21-\x7e]+$",
            description="A payment id: the page starts after it (the last `id` of the "
            "previous page).",
        ),
    ] = None,
    status_: Annotated[
        PaymentStatus | None, Query(alias="status", description="Only payments in this status.")
    ] = None,
) -> PaymentList:
    try:
        page = await payments.list_page(
            client.client_id, limit=limit, starting_after=starting_after, status=status_
        )
    except UnknownCursor:
        raise validation_problem([FieldError("starting_after", "No such payment.")]) from None
    return PaymentList(
        data=[PaymentOut.from_domain(payment) for payment in page.payments],
        has_more=page.has_more,
    )


@router.get(
    "/{payment_id}",
    response_model=PaymentOut,
    summary="Read a payment",
    responses={
        200: {"description": "The payment, current state.", "headers": RATE_LIMIT_HEADERS},
        **problem_responses("payment-not-found", *COMMON_PROBLEMS),
    },
)
async def get_payment(
    payment_id: str, client: CurrentClient, payments: PaymentServiceDep
) -> PaymentOut:
    # Ids are printable ASCII; anything else (a NUL would upset PostgreSQL) is not one.
    known_shape = len(payment_id) <= 64 and all(0x21 <= ord(c) <= 0x7E for c in payment_id)
    payment = await payments.get(client.client_id, payment_id) if known_shape else None
    if payment is None:
        raise payment_not_found()
    return PaymentOut.from_domain(payment)
