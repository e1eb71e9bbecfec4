"""PaymentWorkflow: open the record, charge once, record the outcome, tell the client.

The client's first request and every duplicate attach through the ``await_outcome``
update, which answers as soon as the outcome is in the ledger; the webhook is
delivered afterwards and may retry for hours without holding anyone up.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from temporalio import workflow
from temporalio.common import RetryPolicy, SearchAttributeUpdate
from temporalio.exceptions import ActivityError, ApplicationError, FailureError
from temporalio.exceptions import TimeoutError as ActivityTimeoutError

with workflow.unsafe.imports_passed_through():
    from activities.payments import PaymentActivities
    from domain import search_attributes
    from domain.currencies import format_amount
    from domain.payments import (
        AttachRequest,
        AttachResult,
        ChargeInput,
        ErrorType,
        FindChargeInput,
        NotifyInput,
        OpenPaymentInput,
        Payment,
        PaymentInput,
        PaymentStatus,
        RecordOutcomeInput,
    )

# Ledger writes are short local activities; PostgreSQL coming back is only a matter
# of time, so they retry without limit.
LEDGER_START_TO_CLOSE = timedelta(seconds=10)
LEDGER_RETRY = RetryPolicy(
    initial_interval=timedelta(milliseconds=200),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(seconds=30),
)

# Paid attempts are bounded by a budget; when it runs out the outcome is unknown
# and is resolved by asking the provider, never by guessing.
#
# The workflow retries the charge itself (one attempt per activity, the backoff a
# timer) rather than leaving it to the server's retry policy: so it knows the attempt
# and the last error and can say so in its current details, which support staff read
# in the UI ("attempt 3, last error: provider answered 500").
#
# Each attempt is a local activity (behind the patch below): open, charge and record
# run in one workflow task on the happy path, without a round trip through the task
# queue for the charge. That fits the charge: it is bounded (30 s) and idempotent on
# the payment id, so an attempt re-run after a worker crash gets the first charge back.
# A local attempt never backs off by itself (one attempt each); our timer does.
CHARGE_START_TO_CLOSE = timedelta(seconds=30)
CHARGE_BUDGET = timedelta(minutes=5)
CHARGE_BACKOFF = RetryPolicy(
    initial_interval=timedelta(seconds=1),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(seconds=30),
    non_retryable_error_types=[ErrorType.PAYMENT_DECLINED, ErrorType.INVALID_PAYMENT_REQUEST],
)
CHARGE_ATTEMPT_RETRY = RetryPolicy(maximum_attempts=1)
CHARGE_DETAILS = "Waiting for the provider to charge the card"
# Runs started before this patch charge with regular activities and keep doing so.
CHARGE_AS_LOCAL_ACTIVITY_PATCH = "charge-as-local-activity"
LOOKUP_START_TO_CLOSE = timedelta(seconds=30)
LOOKUP_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=2),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(minutes=2),
)

# A webhook receiver being down must never fail the payment: retry for three days.
WEBHOOK_START_TO_CLOSE = timedelta(seconds=30)
WEBHOOK_BUDGET = timedelta(hours=72)
WEBHOOK_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=5),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(minutes=15),
)

AWAIT_OUTCOME_UPDATE = "await_outcome"

_BUSINESS_FAILURES = {ErrorType.PAYMENT_DECLINED, ErrorType.INVALID_PAYMENT_REQUEST}


def _application_cause(error: ActivityError | ApplicationError) -> ApplicationError | None:
    """The activity's ApplicationError. A regular activity's failure arrives as an
    ActivityError with it as the cause; a local activity's arrives unwrapped (only a
    local activity's timeout is an ActivityError, its cause a TimeoutError)."""
    if isinstance(error, ApplicationError):
        return error
    cause = error.cause
    return cause if isinstance(cause, ApplicationError) else None


def _charge_backoff(failed_attempts: int) -> timedelta:
    """The wait after the n-th failed charge attempt: 1 s doubling to 30 s, as before."""
    initial = CHARGE_BACKOFF.initial_interval
    maximum = CHARGE_BACKOFF.maximum_interval or initial * 100
    return min(initial * CHARGE_BACKOFF.backoff_coefficient ** (failed_attempts - 1), maximum)


def _failure_text(error: ActivityError | ApplicationError) -> str:
    """What went wrong with an attempt, in the provider's or the timeout's words."""
    cause = error if isinstance(error, ApplicationError) else error.cause
    if isinstance(cause, ActivityTimeoutError):
        return f"no answer within {int(CHARGE_START_TO_CLOSE.total_seconds())} s"
    if isinstance(cause, FailureError) and cause.message:
        return cause.message
    return error.message or "unknown error"


def _decline_fields(error: ApplicationError) -> tuple[str, str]:
    details: Any = error.details[0] if error.details else {}
    if isinstance(details, dict):
        return str(details.get("failure_code", "card_declined")), str(
            details.get("failure_message", error.message)
        )
    return "card_declined", error.message


def _outcome_words(outcome: Payment | RecordOutcomeInput) -> str:
    """The outcome as support staff read it first: a failure says its code and the
    provider's words ("failed (card_declined: Your card was declined.)")."""
    if outcome.status != PaymentStatus.FAILED:
        return str(outcome.status)
    reason = outcome.failure_code or "unknown"
    if outcome.failure_message:
        reason = f"{reason}: {outcome.failure_message}"
    return f"failed ({reason})"


def _outcome_search_attributes(payment: Payment) -> list[SearchAttributeUpdate[Any]]:
    """What support staff search by once the outcome is known."""
    updates: list[SearchAttributeUpdate[Any]] = [
        search_attributes.PAYMENT_STATUS.value_set(str(payment.status))
    ]
    if payment.provider_charge_id:
        updates.append(search_attributes.PROVIDER_CHARGE_ID.value_set(payment.provider_charge_id))
    if payment.failure_code:
        updates.append(search_attributes.FAILURE_CODE.value_set(payment.failure_code))
    return updates


@workflow.defn(name="Payment")
class PaymentWorkflow:
    @workflow.init
    def __init__(self, input: PaymentInput) -> None:
        self._input = input
        self._payment: Payment | None = None
        self._key_reused = False

    @workflow.run
    async def run(self, input: PaymentInput) -> Payment:
        workflow.set_current_details("Opening the payment record in the ledger")
        try:
            await workflow.execute_local_activity_method(
                PaymentActivities.open_payment,
                OpenPaymentInput(payment=input),
                start_to_close_timeout=LEDGER_START_TO_CLOSE,
                retry_policy=LEDGER_RETRY,
                summary="Open the payment record",
            )
        except (ActivityError, ApplicationError) as err:
            cause = _application_cause(err)
            if cause is not None and cause.type == ErrorType.IDEMPOTENCY_KEY_REUSED:
                self._key_reused = True
                await workflow.wait_condition(workflow.all_handlers_finished)
            raise

        outcome = await self._charge(input)
        workflow.set_current_details("Recording the outcome in the ledger")
        payment = await workflow.execute_local_activity_method(
            PaymentActivities.record_outcome,
            outcome,
            start_to_close_timeout=LEDGER_START_TO_CLOSE,
            retry_policy=LEDGER_RETRY,
            summary=f"Record {_outcome_words(outcome)} in the ledger",
        )
        self._payment = payment
        workflow.upsert_search_attributes(_outcome_search_attributes(payment))

        await self._notify(payment)
        workflow.set_current_details(f"Done: {_outcome_words(payment)}")
        await workflow.wait_condition(workflow.all_handlers_finished)
        return payment

    async def _charge(self, input: PaymentInput) -> RecordOutcomeInput:
        """Charge within the budget: declines end it at once, anything else is retried
        with backoff until the budget is spent, then the charge is looked up by key."""
        request = input.request
        charge_input = ChargeInput(
            payment_id=input.payment_id,
            amount=request.amount,
            currency=request.currency,
            payment_method=request.payment_method,
            description=request.description,
        )
        summary = f"Charge {format_amount(request.amount, request.currency)} at the provider"
        deadline = workflow.now() + CHARGE_BUDGET
        as_local_activity = workflow.patched(CHARGE_AS_LOCAL_ACTIVITY_PATCH)
        execute = (
            workflow.execute_local_activity_method
            if as_local_activity
            else workflow.execute_activity_method
        )
        attempt, last_error = 1, ""
        while True:
            details = f"{CHARGE_DETAILS} — attempt {attempt}"
            workflow.set_current_details(
                f"{details}, last error: {last_error}" if last_error else details
            )
            try:
                # workflow.now() moves on when a local attempt ends (to its end time, in
                # the marker), so the budget counts the attempt's time either way.
                charge = await execute(
                    PaymentActivities.charge_payment,
                    charge_input,
                    start_to_close_timeout=CHARGE_START_TO_CLOSE,
                    # An attempt still running when the budget ends is cut off there,
                    # as the server's schedule-to-close timeout did.
                    schedule_to_close_timeout=deadline - workflow.now(),
                    retry_policy=CHARGE_ATTEMPT_RETRY,
                    summary=summary if attempt == 1 else f"{summary} (attempt {attempt})",
                )
            except (ActivityError, ApplicationError) as err:
                cause = _application_cause(err)
                if cause is not None and cause.type in _BUSINESS_FAILURES:
                    failure_code, failure_message = _decline_fields(cause)
                    return RecordOutcomeInput(
                        payment_id=input.payment_id,
                        status=PaymentStatus.FAILED,
                        failure_code=failure_code,
                        failure_message=failure_message,
                    )
                backoff = _charge_backoff(attempt)
                # As the server's retry policy did: no attempt that would start after
                # the budget ends, and none after a failure marked non-retryable.
                if (cause is not None and cause.non_retryable) or (
                    workflow.now() + backoff >= deadline
                ):
                    workflow.logger.warning(
                        "Charge budget spent without an answer; asking the provider",
                        extra={"payment_id": input.payment_id, "attempts": attempt},
                    )
                    return await self._resolve_unknown_outcome(input)
                attempt, last_error = attempt + 1, _failure_text(err)
                next_at = (workflow.now() + backoff).strftime("%H:%M:%S UTC")
                workflow.set_current_details(
                    f"{CHARGE_DETAILS} — attempt {attempt} at {next_at}, last error: {last_error}"
                )
                await workflow.sleep(backoff, summary=f"Back off before charge attempt {attempt}")
                if workflow.now() >= deadline:  # the timer fired late, past the budget
                    return await self._resolve_unknown_outcome(input)
                continue
            return RecordOutcomeInput(
                payment_id=input.payment_id,
                status=PaymentStatus.SUCCEEDED,
                provider_charge_id=charge.charge_id,
            )

    async def _resolve_unknown_outcome(self, input: PaymentInput) -> RecordOutcomeInput:
        workflow.set_current_details("Charge outcome unknown: looking it up at the provider")
        found = await workflow.execute_activity_method(
            PaymentActivities.find_charge,
            FindChargeInput(payment_id=input.payment_id),
            start_to_close_timeout=LOOKUP_START_TO_CLOSE,
            retry_policy=LOOKUP_RETRY,
            summary="Look up the charge by its idempotency key",
        )
        if found.charge_id is not None and found.status == "succeeded":
            return RecordOutcomeInput(
                payment_id=input.payment_id,
                status=PaymentStatus.SUCCEEDED,
                provider_charge_id=found.charge_id,
            )
        if found.charge_id is not None:
            return RecordOutcomeInput(
                payment_id=input.payment_id,
                status=PaymentStatus.FAILED,
                provider_charge_id=found.charge_id,
                failure_code=found.failure_code or "card_declined",
                failure_message="The provider declined the charge.",
            )
        return RecordOutcomeInput(
            payment_id=input.payment_id,
            status=PaymentStatus.FAILED,
            failure_code="provider_unavailable",
            failure_message="The provider could not be reached; no charge was made.",
        )

    async def _notify(self, payment: Payment) -> None:
        event_type = (
            "payment.succeeded" if payment.status is PaymentStatus.SUCCEEDED else "payment.failed"
        )
        workflow.set_current_details(f"Delivering the {event_type} webhook to the client")
        try:
            await workflow.execute_activity_method(
                PaymentActivities.notify_webhook,
                NotifyInput(payment_id=payment.id, event_type=event_type),
                start_to_close_timeout=WEBHOOK_START_TO_CLOSE,
                schedule_to_close_timeout=WEBHOOK_BUDGET,
                retry_policy=WEBHOOK_RETRY,
                summary=f"Send the {event_type} webhook",
            )
        except ActivityError:
            # The money moved (or did not) either way; the client can still read the payment.
            workflow.logger.error(
                "Webhook undeliverable within its budget", extra={"payment_id": payment.id}
            )

    @workflow.update(name=AWAIT_OUTCOME_UPDATE)
    async def await_outcome(self, request: AttachRequest) -> AttachResult:
        await workflow.wait_condition(lambda: self._payment is not None or self._key_reused)
        if self._payment is None:
            raise ApplicationError(
                "this idempotency key was already used with a different request",
                type=ErrorType.IDEMPOTENCY_KEY_REUSED,
            )
        return AttachResult(
            payment=self._payment,
            replayed=request.request_id != self._input.origin_request_id,
        )

    @await_outcome.validator
    def _validate_same_request(self, request: AttachRequest) -> None:
        # Rejected updates leave no trace in the history: a conflicting body changes nothing.
        if request.request_fingerprint != self._input.request_fingerprint:
            raise ApplicationError(
                "this idempotency key was already used with a different request",
                type=ErrorType.IDEMPOTENCY_KEY_REUSED,
            )

    @workflow.query(name="status")
    def status(self) -> Payment:
        if self._payment is not None:
            return self._payment
        request = self._input.request
        return Payment(
            id=self._input.payment_id,
            client_id=self._input.client_id,
            idempotency_key=self._input.idempotency_key,
            status=PaymentStatus.PROCESSING,
            amount=request.amount,
            currency=request.currency,
            description=request.description,
            metadata=dict(request.metadata),
        )
