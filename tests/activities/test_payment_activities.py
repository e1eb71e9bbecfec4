"""The activities against the real embedded PostgreSQL and the sandbox provider."""

from __future__ import annotations

import json
import uuid

import pytest
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from standardwebhooks import Webhook
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from activities.payments import PaymentActivities
from admin.clients import add_client
from devstack.webhook_receiver import WebhookReceiver
from domain.payments import (
    ChargeInput,
    ErrorType,
    FindChargeInput,
    NotifyInput,
    OpenPaymentInput,
    PaymentInput,
    PaymentRequest,
    PaymentStatus,
    RecordOutcomeInput,
)
from ledger.repositories import PaymentRepository
from tests.helpers.provider import SandboxProvider


def _payment_input(client_id: str, payment_method: str = "pm_card_visa") -> PaymentInput:
    key = str(uuid.uuid4())
    request = PaymentRequest(amount=4200, currency="EUR", payment_method=payment_method)
    return PaymentInput.for_request(client_id, key, request, "r1")


@pytest.fixture
async def client_id(sessions: async_sessionmaker[AsyncSession]) -> str:
    async with sessions() as session, session.begin():
        created = await add_client(session, name="activity-tests", webhook_url=None)
    return created.client_id


def _charge_input(payment: PaymentInput) -> ChargeInput:
    return ChargeInput(
        payment_id=payment.payment_id,
        amount=payment.request.amount,
        currency=payment.request.currency,
        payment_method=payment.request.payment_method,
    )


async def test_charging_twice_with_one_key_charges_once(
    activities: PaymentActivities, sandbox_provider: SandboxProvider, client_id: str
) -> None:
    payment = _payment_input(client_id)
    env = ActivityEnvironment()

    first = await env.run(activities.charge_payment, _charge_input(payment))
    second = await env.run(activities.charge_payment, _charge_input(payment))

    assert first.charge_id == second.charge_id
    stats = await sandbox_provider.stats()
    assert stats["charges_by_key"][payment.payment_id] == 1
    found = await env.run(activities.find_charge, FindChargeInput(payment.payment_id))
    assert found.charge_id == first.charge_id


async def test_decline_is_a_non_retryable_error_with_its_failure_code(
    activities: PaymentActivities, sandbox_provider: SandboxProvider, client_id: str
) -> None:
    payment = _payment_input(client_id, "pm_card_chargeDeclinedInsufficientFunds")
    with pytest.raises(ApplicationError) as declined:
        await ActivityEnvironment().run(activities.charge_payment, _charge_input(payment))

    assert declined.value.type == ErrorType.PAYMENT_DECLINED
    assert declined.value.non_retryable
    assert declined.value.details[0].failure_code == "insufficient_funds"
    stats = await sandbox_provider.stats()
    assert stats["charges_by_key"].get(payment.payment_id, 0) == 0
    found = await ActivityEnvironment().run(
        activities.find_charge, FindChargeInput(payment.payment_id)
    )
    assert (found.status, found.failure_code) == ("failed", "insufficient_funds")


async def test_provider_outage_is_a_retryable_error(
    activities: PaymentActivities, sandbox_provider: SandboxProvider, client_id: str
) -> None:
    await sandbox_provider.set_faults(fail_next=1)
    payment = _payment_input(client_id)
    with pytest.raises(ApplicationError) as unavailable:
        await ActivityEnvironment().run(activities.charge_payment, _charge_input(payment))
    assert unavailable.value.type == ErrorType.PROVIDER_UNAVAILABLE
    assert not unavailable.value.non_retryable


async def test_recording_twice_posts_one_balanced_set_of_entries(
    activities: PaymentActivities,
    sessions: async_sessionmaker[AsyncSession],
    client_id: str,
) -> None:
    payment = _payment_input(client_id)
    env = ActivityEnvironment()
    await env.run(activities.open_payment, OpenPaymentInput(payment))
    outcome = RecordOutcomeInput(
        payment_id=payment.payment_id, status=PaymentStatus.SUCCEEDED, provider_charge_id="ch_1"
    )

    first = await env.run(activities.record_outcome, outcome)
    second = await env.run(activities.record_outcome, outcome)

    assert first == second
    assert first.status is PaymentStatus.SUCCEEDED
    async with sessions() as session:
        count, total = await PaymentRepository(session).entries_balance(payment.payment_id)
    assert (count, total) == (2, 0)


async def test_a_failed_payment_posts_no_entries(
    activities: PaymentActivities,
    sessions: async_sessionmaker[AsyncSession],
    client_id: str,
) -> None:
    payment = _payment_input(client_id)
    env = ActivityEnvironment()
    await env.run(activities.open_payment, OpenPaymentInput(payment))
    failed = await env.run(
        activities.record_outcome,
        RecordOutcomeInput(
            payment_id=payment.payment_id,
            status=PaymentStatus.FAILED,
            failure_code="card_declined",
            failure_message="Your card was declined.",
        ),
    )
    assert failed.failure_code == "card_declined"
    async with sessions() as session:
        assert await PaymentRepository(session).entries_balance(payment.payment_id) == (0, 0)


async def test_opening_twice_keeps_one_row_and_a_different_body_is_refused(
    activities: PaymentActivities,
    sessions: async_sessionmaker[AsyncSession],
    client_id: str,
) -> None:
    payment = _payment_input(client_id)
    env = ActivityEnvironment()
    first = await env.run(activities.open_payment, OpenPaymentInput(payment))
    again = await env.run(activities.open_payment, OpenPaymentInput(payment))
    assert first == again

    other_body = PaymentRequest(amount=1, currency="EUR", payment_method="pm_card_visa")
    conflicting = PaymentInput(
        **{
            **payment.__dict__,
            "request": other_body,
            "request_fingerprint": other_body.fingerprint(),
        }
    )
    with pytest.raises(ApplicationError) as reused:
        await env.run(activities.open_payment, OpenPaymentInput(conflicting))
    assert reused.value.type == ErrorType.IDEMPOTENCY_KEY_REUSED
    async with sessions() as session:
        stored = await PaymentRepository(session).get_by_key(client_id, payment.idempotency_key)
    assert stored is not None
    assert stored.payment.amount == payment.request.amount


async def test_webhook_is_signed_and_keeps_its_id_across_retries(
    activities: PaymentActivities,
    sessions: async_sessionmaker[AsyncSession],
    webhook_receiver: WebhookReceiver,
) -> None:
    async with sessions() as session, session.begin():
        created = await add_client(session, name="webhook-tests", webhook_url=webhook_receiver.url)
    payment = _payment_input(created.client_id)
    env = ActivityEnvironment()
    await env.run(activities.open_payment, OpenPaymentInput(payment))
    await env.run(
        activities.record_outcome,
        RecordOutcomeInput(payment.payment_id, PaymentStatus.SUCCEEDED, provider_charge_id="ch_2"),
    )

    notify = NotifyInput(payment_id=payment.payment_id, event_type="payment.succeeded")
    await env.run(activities.notify_webhook, notify)
    await env.run(activities.notify_webhook, notify)

    mine = [
        event
        for event in webhook_receiver.received
        if json.loads(event.body)["data"]["id"] == payment.payment_id
    ]
    assert len(mine) == 2
    for event in mine:
        verified = Webhook(created.webhook_secret).verify(event.body, event.headers)
        assert verified["type"] == "payment.succeeded"
        assert verified["data"]["status"] == "succeeded"
    assert mine[0].headers["webhook-id"] == mine[1].headers["webhook-id"]


async def test_webhook_receiver_down_is_a_retryable_error(
    activities: PaymentActivities, sessions: async_sessionmaker[AsyncSession]
) -> None:
    async with sessions() as session, session.begin():
        created = await add_client(
            session, name="down", webhook_url="http://127.0.0.1:9/nothing-listens-here"
        )
    payment = _payment_input(created.client_id)
    env = ActivityEnvironment()
    await env.run(activities.open_payment, OpenPaymentInput(payment))
    with pytest.raises(ApplicationError) as failed:
        await env.run(
            activities.notify_webhook,
            NotifyInput(payment_id=payment.payment_id, event_type="payment.failed"),
        )
    assert failed.value.type == ErrorType.WEBHOOK_DELIVERY_FAILED
    assert not failed.value.non_retryable
