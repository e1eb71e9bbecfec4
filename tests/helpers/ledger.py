"""Payments and refunds put in the ledger as the activities would, for ledger tests."""

from __future__ import annotations

import uuid

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from domain.payments import (
    PaymentInput,
    PaymentRequest,
    PaymentStatus,
    RecordOutcomeInput,
)
from domain.refunds import (
    RecordRefundInput,
    RefundInput,
    RefundRequest,
    RefundStatus,
)
from ledger.repositories import PaymentRepository, RefundRepository


async def payment_in_ledger(
    sessions: async_sessionmaker[AsyncSession],
    client_id: str,
    status: PaymentStatus | None,
    *,
    amount: int = 5000,
    description: str | None = None,
    metadata: dict[str, str] | None = None,
) -> PaymentInput:
    """A payment opened and, unless ``status`` is None, recorded with that outcome."""
    key = str(uuid.uuid4())
    request = PaymentRequest(
        amount=amount,
        currency="EUR",
        payment_method="pm_card_visa",
        description=description,
        metadata=metadata or {},
    )
    payment = PaymentInput.for_request(
        client_id,
        key,
        request,
        uuid.uuid4().hex,
    )
    async with sessions() as session, session.begin():
        repository = PaymentRepository(session)
        await repository.open(payment)
        if status is not None:
            await repository.record_outcome(
                RecordOutcomeInput(
                    payment_id=payment.payment_id,
                    status=status,
                    provider_charge_id="ch_1" if status is PaymentStatus.SUCCEEDED else None,
                    failure_code=None if status is PaymentStatus.SUCCEEDED else "card_declined",
                    failure_message=None if status is PaymentStatus.SUCCEEDED else "Declined.",
                )
            )
    return payment


async def refund_in_ledger(
    sessions: async_sessionmaker[AsyncSession],
    payment: PaymentInput,
    amount: int,
    ok: bool | None,
) -> None:
    """A refund of ``payment``: succeeded, failed, or still pending (``ok`` None)."""
    key = str(uuid.uuid4())
    request = RefundRequest(payment_id=payment.payment_id, amount=amount, reason="duplicate")
    refund = RefundInput.for_request(payment.client_id, key, request, "r")
    async with sessions() as session, session.begin():
        await RefundRepository(session).reserve(refund)
        if ok is None:
            return
        await RefundRepository(session).record_outcome(
            RecordRefundInput(
                refund_id=refund.refund_id,
                status=RefundStatus.SUCCEEDED if ok else RefundStatus.FAILED,
                provider_refund_id="re_1" if ok else None,
                failure_code=None if ok else "provider_error",
            )
        )
