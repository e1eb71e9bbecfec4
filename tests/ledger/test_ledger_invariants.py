"""Invariants the database enforces whatever the code above it does."""

from __future__ import annotations

import uuid

import pytest
from sqlalchemy import func, insert, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from admin.clients import add_client
from domain.payments import (
    PaymentInput,
    PaymentRequest,
    PaymentStatus,
    RecordOutcomeInput,
)
from ledger.repositories import PaymentRepository
from ledger.tables import LedgerEntry


async def _opened_payment(sessions: async_sessionmaker[AsyncSession]) -> PaymentInput:
    async with sessions() as session, session.begin():
        client = await add_client(session, name="ledger-tests", webhook_url=None)
        key = str(uuid.uuid4())
        request = PaymentRequest(amount=900, currency="EUR", payment_method="pm_card_visa")
        payment = PaymentInput.for_request(client.client_id, key, request, "r")
        await PaymentRepository(session).open(payment)
    return payment


async def test_an_unbalanced_posting_is_refused_at_commit(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    payment = await _opened_payment(sessions)
    with pytest.raises(IntegrityError, match="do not sum to zero"):
        async with sessions() as session, session.begin():
            await session.execute(
                insert(LedgerEntry).values(
                    payment_id=payment.payment_id,
                    entry_kind="charge",
                    account="provider:receivable",
                    amount=900,
                    currency="EUR",
                )
            )
    async with sessions() as session:
        assert await PaymentRepository(session).entries_balance(payment.payment_id) == (0, 0)


async def test_one_key_per_client_is_one_payment_row(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    payment = await _opened_payment(sessions)
    other_body = PaymentRequest(amount=1, currency="EUR", payment_method="pm_card_visa")
    async with sessions() as session, session.begin():
        again = await PaymentRepository(session).open(
            PaymentInput.for_request(payment.client_id, payment.idempotency_key, other_body, "r2")
        )
    assert again.payment.amount == 900, "the first request's row stands"
    assert again.request_fingerprint == payment.request_fingerprint


@pytest.mark.parametrize("status", [PaymentStatus.SUCCEEDED, PaymentStatus.FAILED])
async def test_a_recorded_outcome_is_returned_as_stored_and_recorded_once(
    sessions: async_sessionmaker[AsyncSession], status: PaymentStatus
) -> None:
    payment = await _opened_payment(sessions)
    outcome = RecordOutcomeInput(
        payment_id=payment.payment_id,
        status=status,
        provider_charge_id="ch_1" if status is PaymentStatus.SUCCEEDED else None,
        failure_code=None if status is PaymentStatus.SUCCEEDED else "card_declined",
        failure_message=None if status is PaymentStatus.SUCCEEDED else "Declined",
    )
    async with sessions() as session, session.begin():
        recorded = await PaymentRepository(session).record_outcome(outcome)
    async with sessions() as session:
        stored = await PaymentRepository(session).get_by_id(payment.payment_id)
        entries = (
            await session.scalars(
                select(LedgerEntry.amount).where(LedgerEntry.payment_id == payment.payment_id)
            )
        ).all()
    # What the webhook and the waiting requests are told is the row as committed: the
    # server's updated_at and the bumped version (the webhook's sequence) included.
    assert recorded == stored
    assert recorded.status is status
    assert recorded.version == 2
    assert sorted(entries) == ([-900, 900] if status is PaymentStatus.SUCCEEDED else [])

    async with sessions() as session, session.begin():
        again = await PaymentRepository(session).record_outcome(outcome)
    assert again == stored
    async with sessions() as session:
        count = await session.scalar(
            select(func.count()).where(LedgerEntry.payment_id == payment.payment_id)
        )
    assert count == len(entries)
