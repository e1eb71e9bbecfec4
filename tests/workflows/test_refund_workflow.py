"""RefundWorkflow's logic on the time-skipping test server, activities replaced.

The fakes are registered under the real activities' names and count what the
workflow asked of them.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from datetime import timedelta
from typing import Any

import pytest
from temporalio import activity
from temporalio.client import (
    Client,
    WorkflowFailureError,
    WorkflowHandle,
    WorkflowUpdateFailedError,
    WorkflowUpdateStage,
)
from temporalio.exceptions import ApplicationError
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from config.settings import venv_bin
from domain.payments import DeclineDetails, ErrorType, NotifyInput
from domain.refunds import (
    REFUND_REFUSED_ERROR,
    REFUND_REJECTED_BY_PROVIDER_ERROR,
    OpenRefundInput,
    OpenRefundResult,
    ProviderRefundInput,
    ProviderRefundResult,
    RecordRefundInput,
    Refund,
    RefundAttachRequest,
    RefundAttachResult,
    RefundInput,
    RefundRefusal,
    RefundRefusalDetails,
    RefundRequest,
    RefundStatus,
)
from tests.helpers.temporal import register_search_attributes
from workflows.refund import AWAIT_REFUND_UPDATE, RefundWorkflow


@pytest.fixture(scope="module")
async def env() -> AsyncIterator[WorkflowEnvironment]:
    environment = await WorkflowEnvironment.start_time_skipping(
        test_server_existing_path=venv_bin("temporal-test-server")
    )
    try:
        await register_search_attributes(environment.client)
        yield environment
    finally:
        await environment.shutdown()


@dataclass
class FakeRefundPath:
    """Stands in for the ledger's reservation, the provider and the webhook receiver."""

    refusal: RefundRefusal | None = None
    already: RefundStatus = RefundStatus.PENDING
    provider_failures_before_success: int = 0
    provider_rejects: str | None = None
    provider_attempts: int = 0
    provider_refunds: list[str] = field(default_factory=list)
    recorded: list[RecordRefundInput] = field(default_factory=list)
    webhooks: list[NotifyInput] = field(default_factory=list)
    # A refusal waits for this, so a test can attach its request first.
    open_gate: asyncio.Event = field(default_factory=asyncio.Event)

    def activities(self) -> list[Callable[..., Any]]:
        @activity.defn(name="open_refund")
        async def open_refund(input: OpenRefundInput) -> OpenRefundResult:
            if self.refusal is not None:
                await self.open_gate.wait()
                raise ApplicationError(
                    "refund refused",
                    RefundRefusalDetails(self.refusal, "succeeded", 150),
                    type=REFUND_REFUSED_ERROR,
                    non_retryable=True,
                )
            refund = _pending(input.refund)
            return OpenRefundResult(
                refund=replace(refund, status=self.already), provider_charge_id="ch_1"
            )

        @activity.defn(name="refund_at_provider")
        async def refund_at_provider(input: ProviderRefundInput) -> ProviderRefundResult:
            self.provider_attempts += 1
            if self.provider_attempts <= self.provider_failures_before_success:
                raise ApplicationError("provider answered 500", type=ErrorType.PROVIDER_UNAVAILABLE)
            if self.provider_rejects is not None:
                raise ApplicationError(
                    "Refund amount is greater than the unrefunded amount.",
                    DeclineDetails(self.provider_rejects, "too large"),
                    type=REFUND_REJECTED_BY_PROVIDER_ERROR,
                    non_retryable=True,
                )
            # The provider is idempotent on the refund's id.
            if input.refund_id not in self.provider_refunds:
                self.provider_refunds.append(input.refund_id)
            return ProviderRefundResult(provider_refund_id=f"re_{input.refund_id}")

        @activity.defn(name="record_refund_outcome")
        async def record_refund_outcome(input: RecordRefundInput) -> Refund:
            self.recorded.append(input)
            return Refund(
                id=input.refund_id,
                payment_id="pay_1",
                idempotency_key="k",
                status=input.status,
                amount=400,
                currency="EUR",
                provider_refund_id=input.provider_refund_id,
                failure_code=input.failure_code,
                failure_message=input.failure_message,
            )

        @activity.defn(name="notify_webhook")
        async def notify_webhook(input: NotifyInput) -> None:
            self.webhooks.append(input)

        return [open_refund, refund_at_provider, record_refund_outcome, notify_webhook]


def _pending(refund: RefundInput) -> Refund:
    return Refund(
        id=refund.refund_id,
        payment_id=refund.request.payment_id,
        idempotency_key=refund.idempotency_key,
        status=RefundStatus.PENDING,
        amount=refund.request.amount or 400,
        currency="EUR",
    )


def _refund_input() -> RefundInput:
    key = str(uuid.uuid4())
    request = RefundRequest(payment_id="pay_1", amount=400, reason="requested_by_customer")
    return RefundInput.for_request("cli_test", key, request, "first-request")


async def _start(
    client: Client,
    fakes: FakeRefundPath,
    refund: RefundInput,
    task_timeout: timedelta | None = None,
) -> tuple[Worker, WorkflowHandle[RefundWorkflow, Refund]]:
    task_queue = f"tq-{uuid.uuid4()}"
    worker = Worker(
        client, task_queue=task_queue, workflows=[RefundWorkflow], activities=fakes.activities()
    )
    handle = await client.start_workflow(
        RefundWorkflow.run,
        refund,
        id=f"refund-{refund.refund_id}",
        task_queue=task_queue,
        task_timeout=task_timeout,
    )
    return worker, handle


async def _attach(
    handle: WorkflowHandle[RefundWorkflow, Refund], request_id: str, fingerprint: str
) -> RefundAttachResult:
    result: RefundAttachResult = await handle.execute_update(
        AWAIT_REFUND_UPDATE,
        RefundAttachRequest(request_id=request_id, request_fingerprint=fingerprint),
        result_type=RefundAttachResult,
    )
    return result


async def test_a_refund_is_made_once_recorded_and_announced(env: WorkflowEnvironment) -> None:
    fakes = FakeRefundPath()
    refund = _refund_input()
    worker, handle = await _start(env.client, fakes, refund)
    async with worker:
        attached = await _attach(handle, "first-request", refund.request_fingerprint)
        result = await handle.result()

    assert attached.replayed is False
    assert attached.refund.status is RefundStatus.SUCCEEDED
    assert result.provider_refund_id == f"re_{refund.refund_id}"
    assert fakes.provider_refunds == [refund.refund_id]
    assert [(r.status, r.provider_refund_id) for r in fakes.recorded] == [
        (RefundStatus.SUCCEEDED, f"re_{refund.refund_id}")
    ]
    assert fakes.webhooks == [
        NotifyInput(payment_id="pay_1", event_type="refund.succeeded", refund_id=refund.refund_id)
    ]


async def test_a_provider_outage_is_retried_until_the_refund_is_made(
    env: WorkflowEnvironment,
) -> None:
    # Giving up would leave the money's fate unknown: the refund retries for as long as it takes.
    fakes = FakeRefundPath(provider_failures_before_success=12)
    refund = _refund_input()
    worker, handle = await _start(env.client, fakes, refund)
    async with worker:
        started = await env.get_current_time()
        result = await handle.result()
        elapsed = await env.get_current_time() - started

    assert result.status is RefundStatus.SUCCEEDED
    assert fakes.provider_attempts == 13
    assert fakes.provider_refunds == [refund.refund_id]
    assert elapsed > timedelta(minutes=20)


async def test_a_provider_refusal_records_a_failed_refund_without_a_webhook(
    env: WorkflowEnvironment,
) -> None:
    fakes = FakeRefundPath(provider_rejects="amount_too_large")
    refund = _refund_input()
    worker, handle = await _start(env.client, fakes, refund)
    async with worker:
        attached = await _attach(handle, "first-request", refund.request_fingerprint)
        result = await handle.result()

    assert attached.refund.status is RefundStatus.FAILED
    assert result.failure_code == "amount_too_large"
    assert fakes.provider_attempts == 1, "a refusal is final, never retried"
    # Recorded as failed: the ledger releases the reservation.
    assert [r.status for r in fakes.recorded] == [RefundStatus.FAILED]
    assert fakes.webhooks == []


async def test_a_refused_reservation_moves_no_money_and_answers_the_attached_request(
    env: WorkflowEnvironment,
) -> None:
    # The API reserves before it starts a run; this is the workflow's own guard.
    fakes = FakeRefundPath(refusal=RefundRefusal.AMOUNT_EXCEEDS_REFUNDABLE)
    refund = _refund_input()
    # A short task timeout: the running local activity holds the workflow task open
    # until its heartbeat (80 % of it), and only then is the update accepted.
    worker, handle = await _start(env.client, fakes, refund, task_timeout=timedelta(seconds=2))
    async with worker:
        # As with the API's update-with-start, the request is attached before the refusal.
        update = await handle.start_update(
            AWAIT_REFUND_UPDATE,
            RefundAttachRequest("first-request", refund.request_fingerprint),
            wait_for_stage=WorkflowUpdateStage.ACCEPTED,
            result_type=RefundAttachResult,
        )
        fakes.open_gate.set()
        with pytest.raises(WorkflowUpdateFailedError) as refused:
            await update.result()
        with pytest.raises(WorkflowFailureError) as failed:
            await handle.result()

    for cause in (refused.value.cause, failed.value.cause):
        assert isinstance(cause, ApplicationError)
        assert cause.type == REFUND_REFUSED_ERROR
        assert cause.message == "the refund was refused", "the workflow's answer, not a crash"
        assert cause.details[0]["refusal"] == "amount_exceeds_refundable"
        assert cause.details[0]["amount_refundable"] == 150
    assert fakes.provider_attempts == 0
    assert fakes.recorded == []


async def test_duplicates_attach_replayed_and_another_body_is_rejected(
    env: WorkflowEnvironment,
) -> None:
    fakes = FakeRefundPath()
    refund = _refund_input()
    worker, handle = await _start(env.client, fakes, refund)
    async with worker:
        with pytest.raises(WorkflowUpdateFailedError) as rejected:
            await _attach(handle, "other-request", "a-different-fingerprint")
        first = await _attach(handle, "first-request", refund.request_fingerprint)
        duplicate = await _attach(handle, "second-request", refund.request_fingerprint)
        await handle.result()

    assert isinstance(rejected.value.cause, ApplicationError)
    assert rejected.value.cause.type == ErrorType.IDEMPOTENCY_KEY_REUSED
    assert duplicate.refund == first.refund
    assert (first.replayed, duplicate.replayed) == (False, True)
    assert fakes.provider_refunds == [refund.refund_id]


async def test_a_refund_the_ledger_already_settled_is_not_made_again(
    env: WorkflowEnvironment,
) -> None:
    # A run after Temporal's retention forgot the first: the ledger row is the answer.
    fakes = FakeRefundPath(already=RefundStatus.SUCCEEDED)
    refund = _refund_input()
    worker, handle = await _start(env.client, fakes, refund)
    async with worker:
        result = await handle.result()

    assert result.status is RefundStatus.SUCCEEDED
    assert fakes.provider_attempts == 0
    assert fakes.recorded == []
    assert fakes.webhooks == []
