"""The refund activities against the real embedded PostgreSQL and the sandbox provider."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from activities.provider_client import ProviderClient
from activities.refunds import RefundActivities
from admin.clients import add_client
from domain.payments import (
    PaymentInput,
    PaymentRequest,
    PaymentStatus,
    RecordOutcomeInput,
)
from domain.refunds import (
    REFUND_REFUSED_ERROR,
    REFUND_REJECTED_BY_PROVIDER_ERROR,
    OpenRefundInput,
    ProviderRefundInput,
    RecordRefundInput,
    RefundInput,
    RefundRequest,
    RefundStatus,
)
from ledger.repositories import PaymentRepository
from tests.helpers.provider import SandboxProvider


@pytest.fixture(scope="module")
async def refunds(
    sessions: async_sessionmaker[AsyncSession], sandbox_provider: SandboxProvider
) -> AsyncIterator[RefundActivities]:
    async with ProviderClient(sandbox_provider.base_url, sandbox_provider.api_key, 2.0) as client:
        yield RefundActivities(sessions, client)


async def _charged_payment(
    sessions: async_sessionmaker[AsyncSession], sandbox_provider: SandboxProvider
) -> PaymentInput:
    """A payment really charged at the sandbox and recorded as succeeded."""
    async with sessions() as session, session.begin():
        client = await add_client(session, name="refund-activity-tests", webhook_url=None)
    key = str(uuid.uuid4())
    request = PaymentRequest(amount=1000, currency="EUR", payment_method="pm_card_visa")
    payment = PaymentInput.for_request(client.client_id, key, request, "r")
    async with ProviderClient(sandbox_provider.base_url, sandbox_provider.api_key, 2.0) as provider:
        charge = await provider.charge(
            idempotency_key=payment.payment_id,
            amount=1000,
            currency="EUR",
            payment_method="pm_card_visa",
        )
    async with sessions() as session, session.begin():
        repository = PaymentRepository(session)
        await repository.open(payment)
        await repository.record_outcome(
            RecordOutcomeInput(payment.payment_id, PaymentStatus.SUCCEEDED, charge.id)
        )
    return payment


def _refund_input(payment: PaymentInput, amount: int | None) -> RefundInput:
    key = str(uuid.uuid4())
    request = RefundRequest(payment_id=payment.payment_id, amount=amount)
    return RefundInput.for_request(payment.client_id, key, request, "r")


async def test_a_retried_provider_refund_refunds_once(
    refunds: RefundActivities,
    sessions: async_sessionmaker[AsyncSession],
    sandbox_provider: SandboxProvider,
) -> None:
    payment = await _charged_payment(sessions, sandbox_provider)
    env = ActivityEnvironment()
    opened = await env.run(refunds.open_refund, OpenRefundInput(_refund_input(payment, 400)))
    call = ProviderRefundInput(opened.refund.id, opened.provider_charge_id, opened.refund.amount)

    first = await env.run(refunds.refund_at_provider, call)
    retried = await env.run(refunds.refund_at_provider, call)
    recorded = await env.run(
        refunds.record_refund_outcome,
        RecordRefundInput(opened.refund.id, RefundStatus.SUCCEEDED, first.provider_refund_id),
    )

    assert retried == first
    stats = await sandbox_provider.stats()
    assert stats["refunds_by_charge"][opened.provider_charge_id] == {"count": 1, "amount": 400}
    assert recorded.status is RefundStatus.SUCCEEDED
    async with sessions() as session:
        assert await PaymentRepository(session).entries_balance(payment.payment_id) == (4, 0)


async def test_a_provider_refusal_is_final_and_typed(
    refunds: RefundActivities,
    sessions: async_sessionmaker[AsyncSession],
    sandbox_provider: SandboxProvider,
) -> None:
    payment = await _charged_payment(sessions, sandbox_provider)
    opened = await ActivityEnvironment().run(
        refunds.open_refund, OpenRefundInput(_refund_input(payment, None))
    )
    too_much = ProviderRefundInput(opened.refund.id, opened.provider_charge_id, 1001)
    with pytest.raises(ApplicationError) as refused:
        await ActivityEnvironment().run(refunds.refund_at_provider, too_much)
    assert refused.value.type == REFUND_REJECTED_BY_PROVIDER_ERROR
    assert refused.value.non_retryable


async def test_opening_a_refund_over_what_remains_is_refused(
    refunds: RefundActivities,
    sessions: async_sessionmaker[AsyncSession],
    sandbox_provider: SandboxProvider,
) -> None:
    payment = await _charged_payment(sessions, sandbox_provider)
    with pytest.raises(ApplicationError) as refused:
        await ActivityEnvironment().run(
            refunds.open_refund, OpenRefundInput(_refund_input(payment, 1001))
        )
    assert refused.value.type == REFUND_REFUSED_ERROR
    assert refused.value.non_retryable
