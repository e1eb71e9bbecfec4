"""The worker's plain-SQL ledger statements: the same answers as the ORM, exactly once
under concurrency."""

from __future__ import annotations

import asyncio
import uuid
from datetime import timedelta

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from admin.clients import add_client
from admin.webhooks import rotate_webhook_secret_async
from domain.payments import (
    PaymentInput,
    PaymentRequest,
    PaymentStatus,
    RecordOutcomeInput,
)
from ledger.payment_sql import PooledPaymentLedger
from ledger.repositories import ClientRepository, PaymentRepository
from ledger.tables import LedgerEntry, PaymentRow
from tests.helpers.ledger import payment_in_ledger, refund_in_ledger


def _input(client_id: str, key: str, amount: int, origin: str) -> PaymentInput:
    request = PaymentRequest(
        amount=amount, currency="EUR", payment_method="pm_card_visa", metadata={"n": origin}
    )
    return PaymentInput.for_request(client_id, key, request, origin)


async def test_the_webhook_read_equals_the_repositories_for_every_kind_of_payment(
    database_url: str,
    sessions: async_sessionmaker[AsyncSession],
    payment_ledger: PooledPaymentLedger,
) -> None:
    async with sessions() as session, session.begin():
        client = await add_client(
            session, name="webhook-read", webhook_url="https://hooks.example.com/in"
        )
    # Two replaced secrets still inside their overlap, newest first after the current one.
    for _ in range(2):
        await rotate_webhook_secret_async(
            database_url, client.client_id, overlap=timedelta(hours=1)
        )
    refunded = await payment_in_ledger(sessions, client.client_id, PaymentStatus.SUCCEEDED)
    for amount, ok in [(1000, True), (700, False), (250, None)]:
        await refund_in_ledger(sessions, refunded, amount, ok)
    payments = [
        await payment_in_ledger(sessions, client.client_id, None, metadata={"order": "1"}),
        await payment_in_ledger(sessions, client.client_id, PaymentStatus.FAILED),
        await payment_in_ledger(sessions, client.client_id, PaymentStatus.SUCCEEDED),
        refunded,
    ]

    for payment in payments:
        found = await payment_ledger.payment_for_webhook(payment.payment_id)
        assert found is not None
        async with sessions() as session:
            orm_payment = await PaymentRepository(session).get_by_id(payment.payment_id)
            orm_target = await ClientRepository(session).webhook_target(client.client_id)
        assert found == (orm_payment, orm_target)

    found = await payment_ledger.payment_for_webhook(refunded.payment_id)
    assert found is not None
    read, target = found
    assert [(r.amount, r.status.value) for r in read.refunds] == [
        (1000, "succeeded"),
        (700, "failed"),
        (250, "pending"),
    ]
    assert read.version == 2 + 2 * 2 + 1  # opened, succeeded; two settled, one reserved
    assert target.url == "https://hooks.example.com/in"
    assert len(target.signing_secrets) == 3
    assert await payment_ledger.payment_for_webhook("pay_no_such_payment") is None


async def test_racing_outcomes_record_one_of_them_once_and_all_callers_read_it(
    sessions: async_sessionmaker[AsyncSession], payment_ledger: PooledPaymentLedger
) -> None:
    """Ten recorders of each outcome at once (a retried local activity racing its first
    attempt, at worst): one wins, its entries are posted once, everyone gets its row."""
    async with sessions() as session, session.begin():
        client = await add_client(session, name="record-race", webhook_url=None)
    payment = await payment_in_ledger(sessions, client.client_id, None)
    succeeded = RecordOutcomeInput(
        payment_id=payment.payment_id, status=PaymentStatus.SUCCEEDED, provider_charge_id="ch_1"
    )
    failed = RecordOutcomeInput(
        payment_id=payment.payment_id,
        status=PaymentStatus.FAILED,
        failure_code="card_declined",
        failure_message="Declined.",
    )

    answers = await asyncio.gather(
        *(payment_ledger.record_outcome(o) for _ in range(10) for o in (succeeded, failed))
    )

    winner = answers[0]
    assert all(a == winner for a in answers), "every caller reads the one outcome"
    assert winner.version == 2
    async with sessions() as session:
        row = await session.get(PaymentRow, payment.payment_id)
        entries = (
            await session.scalars(
                select(LedgerEntry.amount).where(LedgerEntry.payment_id == payment.payment_id)
            )
        ).all()
        stored = await PaymentRepository(session).get_by_id(payment.payment_id)
    assert row is not None
    assert row.status == winner.status.value
    assert stored == winner
    expected = [-5000, 5000] if winner.status is PaymentStatus.SUCCEEDED else []
    assert sorted(entries) == expected


async def test_racing_opens_of_one_key_make_one_row_and_all_read_the_first(
    sessions: async_sessionmaker[AsyncSession], payment_ledger: PooledPaymentLedger
) -> None:
    """The API and the workflow open the same row at once: the statement that loses the
    insert reads the winner's row (committed after its own snapshot was taken)."""
    async with sessions() as session, session.begin():
        client = await add_client(session, name="open-race", webhook_url=None)
    key = str(uuid.uuid4())
    inputs = [_input(client.client_id, key, 700, f"r{n}") for n in range(20)]

    opened = await asyncio.gather(*(payment_ledger.open_payment(i) for i in inputs))

    origins = {o.origin_request_id for o in opened}
    assert len(origins) == 1
    winner = next(i for i in inputs if i.origin_request_id in origins)
    assert all(o.payment == opened[0].payment for o in opened)
    assert opened[0].payment.status is PaymentStatus.PROCESSING
    assert opened[0].payment.metadata == {"n": winner.origin_request_id}
    assert opened[0].payment.version == 1
    async with sessions() as session:
        rows = (
            await session.scalars(
                select(PaymentRow).where(PaymentRow.client_id == client.client_id)
            )
        ).all()
    assert len(rows) == 1
    assert rows[0].origin_request_id == winner.origin_request_id


async def test_opens_of_one_payment_racing_each_other_all_find_the_one_row(
    sessions: async_sessionmaker[AsyncSession], payment_ledger: PooledPaymentLedger
) -> None:
    """The API and the worker open the same payment, sometimes at the same moment: each
    insert must end on the one row, never on the primary key's unique violation (the
    conflict clause named only the (client, key) constraint, and a 500 followed)."""
    async with sessions() as session, session.begin():
        client = await add_client(session, name="race", webhook_url=None)
    for _ in range(20):
        payment = _input(client.client_id, str(uuid.uuid4()), 700, "r1")
        opened = await asyncio.gather(*(payment_ledger.open_payment(payment) for _ in range(8)))
        assert {stored.payment.id for stored in opened} == {payment.payment_id}
