"""PaymentWorkflow's logic on the time-skipping test server, activities replaced.

The fakes are registered under the real activities' names, as samples-python does,
and count what the workflow asked of them.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import pytest
from temporalio import activity
from temporalio.api.enums.v1 import EventType
from temporalio.api.sdk.v1 import WorkflowMetadata
from temporalio.client import (
    Client,
    WorkflowFailureError,
    WorkflowHandle,
    WorkflowUpdateFailedError,
)
from temporalio.exceptions import ApplicationError
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from config.settings import venv_bin
from domain.payments import (
    AttachRequest,
    AttachResult,
    ChargeInput,
    ChargeResult,
    DeclineDetails,
    ErrorType,
    FindChargeInput,
    FindChargeResult,
    NotifyInput,
    OpenPaymentInput,
    Payment,
    PaymentInput,
    PaymentRequest,
    PaymentStatus,
    RecordOutcomeInput,
)
from tests.helpers.eventually import wait_until
from tests.helpers.history import (
    activity_endings,
    charge_attempts,
    patches_recorded,
    regular_activities_scheduled,
)
from tests.helpers.temporal import encrypting_data_converter, register_search_attributes
from workflows.payment import (
    AWAIT_OUTCOME_UPDATE,
    CHARGE_AS_LOCAL_ACTIVITY_PATCH,
    PaymentWorkflow,
)


@pytest.fixture(scope="module")
async def env() -> AsyncIterator[WorkflowEnvironment]:
    environment = await WorkflowEnvironment.start_time_skipping(
        test_server_existing_path=venv_bin("temporal-test-server"),
        data_converter=encrypting_data_converter(),
    )
    try:
        await register_search_attributes(environment.client)
        yield environment
    finally:
        await environment.shutdown()


@dataclass
class FakeProviderAndLedger:
    """Stands in for the provider, the ledger and the webhook receiver."""

    charge_failures_before_success: int = 0
    decline_code: str | None = None
    webhook_failures: int = 0
    charge_attempts: int = 0
    charges: list[str] = field(default_factory=list)
    recorded: list[RecordOutcomeInput] = field(default_factory=list)
    webhook_attempts: int = 0
    webhooks_delivered: list[NotifyInput] = field(default_factory=list)
    opened: dict[str, PaymentInput] = field(default_factory=dict)
    # What a lookup by idempotency key finds once the charge budget is spent.
    charge_found_by_lookup: str | None = None
    lookups: int = 0
    # The ledger holds this key with another request (Temporal forgot the first run).
    key_taken_in_ledger: bool = False

    def activities(self) -> list[Callable[..., Any]]:
        @activity.defn(name="open_payment")
        async def open_payment(input: OpenPaymentInput) -> Payment:
            if self.key_taken_in_ledger:
                raise ApplicationError(
                    "this idempotency key was already used with a different request",
                    type=ErrorType.IDEMPOTENCY_KEY_REUSED,
                    non_retryable=True,
                )
            self.opened[input.payment.payment_id] = input.payment
            return _processing(input.payment)

        @activity.defn(name="charge_payment")
        async def charge_payment(input: ChargeInput) -> ChargeResult:
            self.charge_attempts += 1
            if self.charge_attempts <= self.charge_failures_before_success:
                raise ApplicationError("provider answered 500", type=ErrorType.PROVIDER_UNAVAILABLE)
            if self.decline_code is not None:
                raise ApplicationError(
                    "Your card was declined.",
                    DeclineDetails(self.decline_code, "Your card was declined."),
                    type=ErrorType.PAYMENT_DECLINED,
                    non_retryable=True,
                )
            charge_id = f"ch_{input.payment_id}"
            if charge_id not in self.charges:
                self.charges.append(charge_id)
            return ChargeResult(charge_id=charge_id, status="succeeded")

        @activity.defn(name="find_charge")
        async def find_charge(input: FindChargeInput) -> FindChargeResult:
            self.lookups += 1
            if self.charge_found_by_lookup is None:
                return FindChargeResult(charge_id=None)
            return FindChargeResult(charge_id=self.charge_found_by_lookup, status="succeeded")

        @activity.defn(name="record_outcome")
        async def record_outcome(input: RecordOutcomeInput) -> Payment:
            self.recorded.append(input)
            opened = self.opened[input.payment_id]
            return Payment(
                **{
                    **_processing(opened).__dict__,
                    "status": input.status,
                    "provider_charge_id": input.provider_charge_id,
                    "failure_code": input.failure_code,
                    "failure_message": input.failure_message,
                }
            )

        @activity.defn(name="notify_webhook")
        async def notify_webhook(input: NotifyInput) -> None:
            self.webhook_attempts += 1
            if self.webhook_attempts <= self.webhook_failures:
                raise ApplicationError(
                    "receiver answered 503", type=ErrorType.WEBHOOK_DELIVERY_FAILED
                )
            self.webhooks_delivered.append(input)

        return [open_payment, charge_payment, find_charge, record_outcome, notify_webhook]


def _processing(payment: PaymentInput) -> Payment:
    return Payment(
        id=payment.payment_id,
        client_id=payment.client_id,
        idempotency_key=payment.idempotency_key,
        status=PaymentStatus.PROCESSING,
        amount=payment.request.amount,
        currency=payment.request.currency,
    )


def _payment_input(payment_method: str = "pm_card_visa") -> PaymentInput:
    request = PaymentRequest(amount=1250, currency="EUR", payment_method=payment_method)
    return PaymentInput(
        payment_id=f"pay_{uuid.uuid4().hex[:12]}",
        client_id="cli_test",
        idempotency_key=str(uuid.uuid4()),
        request=request,
        request_fingerprint=request.fingerprint(),
        origin_request_id="first-request",
    )


async def _start(
    client: Client, fakes: FakeProviderAndLedger, payment: PaymentInput
) -> tuple[Worker, WorkflowHandle[PaymentWorkflow, Payment]]:
    task_queue = f"tq-{uuid.uuid4()}"
    worker = Worker(
        client, task_queue=task_queue, workflows=[PaymentWorkflow], activities=fakes.activities()
    )
    handle = await client.start_workflow(
        PaymentWorkflow.run, payment, id=f"payment-{payment.payment_id}", task_queue=task_queue
    )
    return worker, handle


async def _attach(
    handle: WorkflowHandle[PaymentWorkflow, Payment], request_id: str, fingerprint: str
) -> AttachResult:
    result: AttachResult = await handle.execute_update(
        AWAIT_OUTCOME_UPDATE,
        AttachRequest(request_id=request_id, request_fingerprint=fingerprint),
        result_type=AttachResult,
    )
    return result


async def test_successful_payment_charges_once_records_and_notifies(
    env: WorkflowEnvironment,
) -> None:
    fakes = FakeProviderAndLedger()
    payment = _payment_input()
    worker, handle = await _start(env.client, fakes, payment)
    async with worker:
        attached = await _attach(handle, "first-request", payment.request_fingerprint)
        result = await handle.result()

    assert attached.payment.status is PaymentStatus.SUCCEEDED
    assert attached.replayed is False
    assert result.status is PaymentStatus.SUCCEEDED
    assert result.provider_charge_id == f"ch_{payment.payment_id}"
    assert fakes.charges == [f"ch_{payment.payment_id}"]
    assert [r.status for r in fakes.recorded] == [PaymentStatus.SUCCEEDED]
    assert [w.event_type for w in fakes.webhooks_delivered] == ["payment.succeeded"]


async def test_open_charge_and_record_run_in_one_workflow_task(env: WorkflowEnvironment) -> None:
    fakes = FakeProviderAndLedger()
    payment = _payment_input()
    worker, handle = await _start(env.client, fakes, payment)
    async with worker:
        result = await handle.result()
    assert result.status is PaymentStatus.SUCCEEDED

    # Up to the webhook, one workflow task did everything: the three local activities
    # (markers), the charge's patch marker with the SDK's TemporalChangeVersion upsert,
    # then the outcome's search attributes. No charge activity on the task queue.
    history = await handle.fetch_history()
    names = [EventType.Name(e.event_type).removeprefix("EVENT_TYPE_") for e in history.events]
    webhook_at = names.index("ACTIVITY_TASK_SCHEDULED")
    assert names[:webhook_at] == [
        "WORKFLOW_EXECUTION_STARTED",
        "WORKFLOW_TASK_SCHEDULED",
        "WORKFLOW_TASK_STARTED",
        "WORKFLOW_TASK_COMPLETED",
        "MARKER_RECORDED",  # open_payment
        "MARKER_RECORDED",  # the patch
        "UPSERT_WORKFLOW_SEARCH_ATTRIBUTES",  # TemporalChangeVersion
        "MARKER_RECORDED",  # charge_payment
        "MARKER_RECORDED",  # record_outcome
        "UPSERT_WORKFLOW_SEARCH_ATTRIBUTES",  # PaymentStatus, ProviderChargeId
    ], names
    assert [(e.activity_type, e.outcome, e.local) for e in activity_endings(history.events)] == [
        ("open_payment", "completed", True),
        ("charge_payment", "completed", True),
        ("record_outcome", "completed", True),
        ("notify_webhook", "completed", False),
    ]
    assert patches_recorded(history.events) == [CHARGE_AS_LOCAL_ACTIVITY_PATCH]


async def test_decline_ends_failed_with_failure_code_and_no_retry(
    env: WorkflowEnvironment,
) -> None:
    fakes = FakeProviderAndLedger(decline_code="insufficient_funds")
    payment = _payment_input("pm_card_chargeDeclinedInsufficientFunds")
    worker, handle = await _start(env.client, fakes, payment)
    async with worker:
        result = await handle.result()
        details = await _current_details(handle)

    assert result.status is PaymentStatus.FAILED
    assert result.failure_code == "insufficient_funds"
    assert fakes.charge_attempts == 1, "a decline is a business outcome, never retried"
    assert fakes.charges == []
    assert [w.event_type for w in fakes.webhooks_delivered] == ["payment.failed"]
    # Where support staff look first: the code and the provider's words.
    outcome = f"failed (insufficient_funds: {result.failure_message})"
    assert result.failure_message
    assert details == f"Done: {outcome}"
    summaries: list[object] = []
    for event in (await handle.fetch_history()).events:
        if event.user_metadata.HasField("summary"):
            summaries += await env.client.data_converter.decode([event.user_metadata.summary])
    assert f"Record {outcome} in the ledger" in summaries, summaries


async def test_provider_errors_are_retried_until_the_charge_succeeds(
    env: WorkflowEnvironment,
) -> None:
    fakes = FakeProviderAndLedger(charge_failures_before_success=2)
    payment = _payment_input()
    worker, handle = await _start(env.client, fakes, payment)
    async with worker:
        result = await handle.result()

    assert result.status is PaymentStatus.SUCCEEDED
    assert fakes.charge_attempts == 3
    assert len(fakes.charges) == 1
    # The workflow retries the charge itself: one local activity per attempt (each one
    # attempt only, as its marker says), with a backoff timer between them; nothing
    # of the charge goes through the task queue.
    history = await handle.fetch_history()
    attempts = charge_attempts(history.events)
    assert [(a.outcome, a.local, a.attempt) for a in attempts] == [
        ("failed", True, 1),
        ("failed", True, 1),
        ("completed", True, 1),
    ]
    assert [a.error_type for a in attempts[:2]] == [ErrorType.PROVIDER_UNAVAILABLE] * 2
    assert regular_activities_scheduled(history.events) == ["notify_webhook"]
    backoffs = [
        event.timer_started_event_attributes.start_to_fire_timeout.ToTimedelta()
        for event in history.events
        if event.HasField("timer_started_event_attributes")
    ]
    assert backoffs == [timedelta(seconds=1), timedelta(seconds=2)]


async def _current_details(handle: WorkflowHandle[PaymentWorkflow, Payment]) -> str:
    metadata: WorkflowMetadata = await handle.query(
        "__temporal_workflow_metadata", result_type=WorkflowMetadata
    )
    return metadata.current_details


async def test_current_details_say_which_attempt_the_charge_is_at_and_its_last_error(
    env: WorkflowEnvironment,
) -> None:
    fakes = FakeProviderAndLedger(charge_failures_before_success=10_000)
    payment = _payment_input()
    worker, handle = await _start(env.client, fakes, payment)
    async with worker:
        # Time stands still until the test waits for the result: the second backoff
        # (2 s) holds the workflow between attempt 2 and 3.
        async def two_attempts_failed() -> bool:
            return fakes.charge_attempts >= 2 and "attempt 3" in await _current_details(handle)

        await wait_until(two_attempts_failed, within=15)
        details = await _current_details(handle)
        assert details.startswith("Waiting for the provider to charge the card — attempt 3 at ")
        assert details.endswith(", last error: provider answered 500")

        fakes.charge_failures_before_success = 0  # the provider recovers
        result = await handle.result()
        final_details = await _current_details(handle)  # a query needs the worker

    assert result.status is PaymentStatus.SUCCEEDED
    assert fakes.charge_attempts == 3
    assert final_details == "Done: succeeded"


async def test_webhook_failing_for_hours_never_fails_the_payment(
    env: WorkflowEnvironment,
) -> None:
    # 20 failures at 5 s doubling to a 15 min cap is about four hours of retrying.
    fakes = FakeProviderAndLedger(webhook_failures=20)
    payment = _payment_input()
    worker, handle = await _start(env.client, fakes, payment)
    async with worker:
        attached = await _attach(handle, "first-request", payment.request_fingerprint)
        assert attached.payment.status is PaymentStatus.SUCCEEDED
        assert fakes.webhooks_delivered == [], "the client got its answer before the webhook"
        started = await env.get_current_time()
        result = await handle.result()
        elapsed = await env.get_current_time() - started

    assert result.status is PaymentStatus.SUCCEEDED
    assert fakes.webhook_attempts == 21
    assert len(fakes.webhooks_delivered) == 1
    assert elapsed > timedelta(hours=3)
    assert len(fakes.charges) == 1


async def test_duplicate_attach_gets_the_same_payment_marked_replayed(
    env: WorkflowEnvironment,
) -> None:
    fakes = FakeProviderAndLedger()
    payment = _payment_input()
    worker, handle = await _start(env.client, fakes, payment)
    async with worker:
        first = await _attach(handle, "first-request", payment.request_fingerprint)
        duplicate = await _attach(handle, "second-request", payment.request_fingerprint)
        await handle.result()

    assert duplicate.payment == first.payment
    assert (first.replayed, duplicate.replayed) == (False, True)
    assert fakes.charge_attempts == 1


async def test_attach_with_a_different_body_is_rejected_and_changes_nothing(
    env: WorkflowEnvironment,
) -> None:
    fakes = FakeProviderAndLedger()
    payment = _payment_input()
    worker, handle = await _start(env.client, fakes, payment)
    async with worker:
        with pytest.raises(WorkflowUpdateFailedError) as rejected:
            await _attach(handle, "other-request", "a-different-fingerprint")
        result = await handle.result()

    assert isinstance(rejected.value.cause, ApplicationError)
    assert rejected.value.cause.type == ErrorType.IDEMPOTENCY_KEY_REUSED
    assert result.status is PaymentStatus.SUCCEEDED
    assert fakes.charge_attempts == 1


async def test_a_key_the_ledger_holds_for_another_request_is_refused(
    env: WorkflowEnvironment,
) -> None:
    # The ledger's refusal is a local activity's failure: it reaches the workflow
    # unwrapped, not as an ActivityError, and must still be read as a refusal.
    fakes = FakeProviderAndLedger(key_taken_in_ledger=True)
    payment = _payment_input()
    worker, handle = await _start(env.client, fakes, payment)
    async with worker:
        # Read as anything else, the refusal would leave the attach waiting for ever.
        with pytest.raises(WorkflowUpdateFailedError) as refused:
            async with asyncio.timeout(30):
                await _attach(handle, "first-request", payment.request_fingerprint)
        with pytest.raises(WorkflowFailureError) as failed:
            await handle.result()

    assert isinstance(refused.value.cause, ApplicationError)
    assert refused.value.cause.type == ErrorType.IDEMPOTENCY_KEY_REUSED
    assert isinstance(failed.value.cause, ApplicationError)
    assert failed.value.cause.type == ErrorType.IDEMPOTENCY_KEY_REUSED
    assert fakes.charge_attempts == 0
    assert fakes.recorded == []


async def test_an_unanswered_charge_is_resolved_by_looking_it_up(env: WorkflowEnvironment) -> None:
    # The provider charged but no answer ever came back within the charge budget.
    fakes = FakeProviderAndLedger(
        charge_failures_before_success=10_000, charge_found_by_lookup="ch_found_later"
    )
    payment = _payment_input()
    worker, handle = await _start(env.client, fakes, payment)
    async with worker:
        result = await handle.result()

    assert result.status is PaymentStatus.SUCCEEDED
    assert result.provider_charge_id == "ch_found_later"
    assert fakes.lookups == 1
    assert fakes.charge_attempts > 3, "paid attempts were retried until the budget ran out"


async def test_a_charge_the_provider_never_saw_fails_without_guessing(
    env: WorkflowEnvironment,
) -> None:
    fakes = FakeProviderAndLedger(charge_failures_before_success=10_000)
    payment = _payment_input()
    worker, handle = await _start(env.client, fakes, payment)
    async with worker:
        result = await handle.result()

    assert result.status is PaymentStatus.FAILED
    assert result.failure_code == "provider_unavailable"
    assert fakes.lookups == 1
    assert [w.event_type for w in fakes.webhooks_delivered] == ["payment.failed"]
