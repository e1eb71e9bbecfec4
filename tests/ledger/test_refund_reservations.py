"""Refund reservations against the real PostgreSQL: never more than the payment."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from sqlalchemy import insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from admin.clients import add_client
from domain.payments import (
    PaymentInput,
    PaymentStatus,
)
from domain.refunds import (
    RecordRefundInput,
    RefundInput,
    RefundRefusal,
    RefundRequest,
    RefundStatus,
    Reservation,
)
from ledger.repositories import PaymentRepository, RefundRepository
from ledger.tables import RefundRow
from tests.helpers.ledger import payment_in_ledger

AMOUNT = 1000


async def _payment(
    sessions: async_sessionmaker[AsyncSession], status: PaymentStatus | None
) -> PaymentInput:
    async with sessions() as session, session.begin():
        client = await add_client(session, name="refund-tests", webhook_url=None)
    return await payment_in_ledger(sessions, client.client_id, status, amount=AMOUNT)


def _refund(payment: PaymentInput, amount: int | None, key: str | None = None) -> RefundInput:
    key = key or str(uuid.uuid4())
    request = RefundRequest(payment_id=payment.payment_id, amount=amount)
    return RefundInput.for_request(payment.client_id, key, request, "r")


async def _reserve(sessions: async_sessionmaker[AsyncSession], refund: RefundInput) -> Reservation:
    async with sessions() as session, session.begin():
        return await RefundRepository(session).reserve(refund)


async def test_twenty_concurrent_reservations_never_exceed_the_payment(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    payment = await _payment(sessions, PaymentStatus.SUCCEEDED)
    amounts = [70 + 5 * i for i in range(20)]  # 2350 in all
    reservations = await asyncio.gather(
        *(_reserve(sessions, _refund(payment, amount)) for amount in amounts)
    )

    reserved = [r.refund for r in reservations if r.refund is not None]
    refused = [r for r in reservations if r.refusal is not None]
    assert reserved
    assert refused
    assert sum(r.amount for r in reserved) <= AMOUNT
    assert {r.refusal for r in refused} == {RefundRefusal.AMOUNT_EXCEEDS_REFUNDABLE}
    async with sessions() as session:
        stored = await PaymentRepository(session).get_by_id(payment.payment_id)
    assert stored is not None
    assert stored.amount_refundable == AMOUNT - sum(r.amount for r in reserved)
    assert len(stored.refunds) == len(reserved)
    # Opened (1), succeeded (2), then one version per reservation.
    assert stored.version == 2 + len(reserved)


async def test_the_database_refuses_an_over_refund_written_past_the_repository(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    payment = await _payment(sessions, PaymentStatus.SUCCEEDED)
    assert (await _reserve(sessions, _refund(payment, 800))).refund is not None
    with pytest.raises(IntegrityError, match="would exceed its amount"):
        async with sessions() as session, session.begin():
            await session.execute(
                insert(RefundRow).values(
                    id="ref_forged",
                    payment_id=payment.payment_id,
                    client_id=payment.client_id,
                    idempotency_key="forged",
                    request_fingerprint="x",
                    amount=300,
                    currency="EUR",
                    status="pending",
                    workflow_id="refund/forged",
                )
            )


@pytest.mark.parametrize("status", [None, PaymentStatus.FAILED])
async def test_an_unfinished_or_failed_payment_is_not_refundable(
    sessions: async_sessionmaker[AsyncSession], status: PaymentStatus | None
) -> None:
    payment = await _payment(sessions, status)
    reservation = await _reserve(sessions, _refund(payment, None))
    assert reservation.refusal is RefundRefusal.PAYMENT_NOT_REFUNDABLE
    assert reservation.payment_status == (status or PaymentStatus.PROCESSING).value
    async with sessions() as session:
        assert await RefundRepository(session).for_payment(payment.payment_id) == []


async def test_a_reservation_is_idempotent_per_key_and_judges_the_body(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    payment = await _payment(sessions, PaymentStatus.SUCCEEDED)
    key = str(uuid.uuid4())
    first = await _reserve(sessions, _refund(payment, None, key))
    again = await _reserve(sessions, _refund(payment, None, key))
    other_body = await _reserve(sessions, _refund(payment, 10, key))

    assert first.created is True
    assert first.refund is not None
    assert first.refund.amount == AMOUNT, "no amount means what remains"
    assert again.created is False
    assert again.refund == first.refund
    assert other_body.refusal is RefundRefusal.IDEMPOTENCY_KEY_REUSED


async def test_a_failed_refund_releases_and_a_succeeded_one_posts_balanced_entries(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    payment = await _payment(sessions, PaymentStatus.SUCCEEDED)
    failing = await _reserve(sessions, _refund(payment, 600))
    assert failing.refund is not None
    assert (await _reserve(sessions, _refund(payment, 600))).refusal is not None

    async with sessions() as session, session.begin():
        await RefundRepository(session).record_outcome(
            RecordRefundInput(failing.refund.id, RefundStatus.FAILED, failure_code="x")
        )
    succeeding = await _reserve(sessions, _refund(payment, 600))
    assert succeeding.refund is not None, "the failed refund released its 600"
    async with sessions() as session, session.begin():
        repository = RefundRepository(session)
        done = await repository.record_outcome(
            RecordRefundInput(succeeding.refund.id, RefundStatus.SUCCEEDED, "re_1")
        )
        # Recording twice changes nothing.
        await repository.record_outcome(
            RecordRefundInput(succeeding.refund.id, RefundStatus.SUCCEEDED, "re_1")
        )

    assert done.status is RefundStatus.SUCCEEDED
    async with sessions() as session:
        payments = PaymentRepository(session)
        assert await payments.entries_balance(payment.payment_id) == (4, 0)
        stored = await payments.get_by_id(payment.payment_id)
    assert stored is not None
    assert stored.amount_refunded == 600
    assert stored.amount_refundable == AMOUNT - 600


async def test_one_key_raced_for_two_payments_reserves_one_refund_and_refuses_the_other(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    """Each reservation holds its own payment's row lock, so nothing orders them: the
    second insert must meet the first on the key, never fail on the primary key."""
    async with sessions() as session, session.begin():
        client = await add_client(session, name="refund-race", webhook_url=None)
    first, second = [
        await payment_in_ledger(sessions, client.client_id, PaymentStatus.SUCCEEDED, amount=AMOUNT)
        for _ in range(2)
    ]
    for _ in range(10):
        key = str(uuid.uuid4())
        reservations = await asyncio.gather(
            _reserve(sessions, _refund(first, 10, key)),
            _reserve(sessions, _refund(second, 10, key)),
        )
        assert sum(r.refund is not None for r in reservations) == 1
        assert [r.refusal for r in reservations if r.refund is None] == [
            RefundRefusal.IDEMPOTENCY_KEY_REUSED
        ]
