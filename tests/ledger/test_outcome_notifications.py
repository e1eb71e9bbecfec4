"""The ledger wakes the API requests waiting on a payment: when its row is opened (for
those that have no row yet) and when its outcome is recorded (for all)."""

from __future__ import annotations

import asyncio
import uuid

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from admin.clients import add_client
from domain.payments import (
    PaymentInput,
    PaymentRequest,
    PaymentStatus,
    RecordOutcomeInput,
)
from ledger.outcomes import OutcomeListener
from ledger.repositories import PaymentRepository

WAKE_WITHIN = 5.0


async def _woken(event: asyncio.Event, within: float) -> bool:
    try:
        async with asyncio.timeout(within):
            await event.wait()
    except TimeoutError:
        return False
    return True


async def test_waiters_wake_on_open_until_they_have_the_row_and_all_wake_on_the_outcome(
    sessions: async_sessionmaker[AsyncSession], database_url: str
) -> None:
    async with sessions() as session, session.begin():
        client = await add_client(session, name="notify-tests", webhook_url=None)
    key = str(uuid.uuid4())
    request = PaymentRequest(amount=700, currency="EUR", payment_method="pm_card_visa")
    payment = PaymentInput.for_request(client.client_id, key, request, "origin")
    listener = OutcomeListener(database_url)
    await listener.start()
    try:
        await _woken(listener.connected, WAKE_WITHIN)
        async with (
            listener.subscription(payment.payment_id) as without_row,
            listener.subscription(payment.payment_id) as with_row,
        ):
            # Connecting woke everyone (nothing announced before it may be missed).
            without_row.changed.clear()
            with_row.changed.clear()
            with_row.row_known = True

            async with sessions() as session, session.begin():
                await PaymentRepository(session).open(payment)
            assert await _woken(without_row.changed, WAKE_WITHIN), "the row appeared"
            assert not await _woken(with_row.changed, 0.5), "it has the row: only outcomes"

            without_row.changed.clear()
            async with sessions() as session, session.begin():
                await PaymentRepository(session).open(payment)  # again: nothing new
            assert not await _woken(without_row.changed, 0.5), "a second open inserts nothing"

            async with sessions() as session, session.begin():
                await PaymentRepository(session).record_outcome(
                    RecordOutcomeInput(
                        payment_id=payment.payment_id,
                        status=PaymentStatus.FAILED,
                        failure_code="card_declined",
                        failure_message="declined",
                    )
                )
            assert await _woken(with_row.changed, WAKE_WITHIN)
            assert await _woken(without_row.changed, WAKE_WITHIN)
    finally:
        await listener.stop()
