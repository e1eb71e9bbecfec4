"""RefundWorkflow: reserve the amount, refund once at the provider, record, tell the client.

The API reserves the refund in the ledger before it starts this workflow, so a
refused refund (payment not succeeded, amount over what remains) never gets
here; ``open_refund`` then finds the reservation. The client's request and every
duplicate attach through the ``await_refund`` update.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError

with workflow.unsafe.imports_passed_through():
    from activities.payments import PaymentActivities
    from activities.refunds import RefundActivities
    from activities.webhook_events import REFUND_SUCCEEDED
    from domain import search_attributes
    from domain.payments import ErrorType, NotifyInput
    from domain.refunds import (
        REFUND_REFUSED_ERROR,
        REFUND_REJECTED_BY_PROVIDER_ERROR,
        OpenRefundInput,
        OpenRefundResult,
        ProviderRefundInput,
        RecordRefundInput,
        Refund,
        RefundAttachRequest,
        RefundAttachResult,
        RefundInput,
        RefundStatus,
    )
    from workflows.payment import (
        LEDGER_RETRY,
        LEDGER_START_TO_CLOSE,
        WEBHOOK_BUDGET,
        WEBHOOK_RETRY,
        WEBHOOK_START_TO_CLOSE,
    )

# The provider's refund is idempotent on the refund's id, so retrying is always
# safe, and giving up is not: the money may have moved. It retries until it has an
# answer; a refusal (over-refund, charge not refundable) is final.
PROVIDER_REFUND_START_TO_CLOSE = timedelta(seconds=30)
PROVIDER_REFUND_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=1),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(minutes=5),
    non_retryable_error_types=[REFUND_REJECTED_BY_PROVIDER_ERROR],
)

AWAIT_REFUND_UPDATE = "await_refund"


def _refused(details: Any) -> ApplicationError:
    return ApplicationError(
        "the refund was refused", details, type=REFUND_REFUSED_ERROR, non_retryable=True
    )


@workflow.defn(name="Refund")
class RefundWorkflow:
    @workflow.init
    def __init__(self, input: RefundInput) -> None:
        self._input = input
        self._opened: OpenRefundResult | None = None
        self._refund: Refund | None = None
        self._refusal: Any = None

    @workflow.run
    async def run(self, input: RefundInput) -> Refund:
        workflow.set_current_details("Reserving the refund against the payment")
        try:
            opened = await workflow.execute_local_activity_method(
                RefundActivities.open_refund,
                OpenRefundInput(refund=input),
                start_to_close_timeout=LEDGER_START_TO_CLOSE,
                retry_policy=LEDGER_RETRY,
                summary="Reserve the refund against the payment",
            )
        except (ActivityError, ApplicationError) as err:
            # A failed local activity surfaces as its own ApplicationError in this SDK.
            cause = err.cause if isinstance(err, ActivityError) else err
            if isinstance(cause, ApplicationError) and cause.type == REFUND_REFUSED_ERROR:
                self._refusal = cause.details[0] if cause.details else {}
                workflow.set_current_details("Refused: nothing was refunded")
                await workflow.wait_condition(workflow.all_handlers_finished)
                raise _refused(self._refusal) from err
            raise
        self._opened = opened
        if opened.refund.status.is_terminal:
            # A run after Temporal forgot the first one: the ledger already has the outcome.
            self._refund = opened.refund
            await workflow.wait_condition(workflow.all_handlers_finished)
            return opened.refund

        outcome = await self._refund_at_provider(opened)
        workflow.set_current_details("Recording the refund's outcome in the ledger")
        refund = await workflow.execute_local_activity_method(
            RefundActivities.record_refund_outcome,
            outcome,
            start_to_close_timeout=LEDGER_START_TO_CLOSE,
            retry_policy=LEDGER_RETRY,
            summary=f"Record the refund as {outcome.status} in the ledger",
        )
        self._refund = refund
        if refund.failure_code:
            workflow.upsert_search_attributes(
                [search_attributes.FAILURE_CODE.value_set(refund.failure_code)]
            )
        if refund.status is RefundStatus.SUCCEEDED:
            await self._notify(refund)
        workflow.set_current_details(f"Done: {refund.status}")
        await workflow.wait_condition(workflow.all_handlers_finished)
        return refund

    async def _refund_at_provider(self, opened: OpenRefundResult) -> RecordRefundInput:
        refund = opened.refund
        workflow.set_current_details("Waiting for the provider to refund the charge")
        try:
            result = await workflow.execute_activity_method(
                RefundActivities.refund_at_provider,
                ProviderRefundInput(
                    refund_id=refund.id,
                    provider_charge_id=opened.provider_charge_id,
                    amount=refund.amount,
                ),
                start_to_close_timeout=PROVIDER_REFUND_START_TO_CLOSE,
                retry_policy=PROVIDER_REFUND_RETRY,
                summary=f"Refund {refund.amount} {refund.currency} of charge "
                f"{opened.provider_charge_id} at the provider",
            )
        except ActivityError as err:
            cause = err.cause
            if (
                isinstance(cause, ApplicationError)
                and cause.type == REFUND_REJECTED_BY_PROVIDER_ERROR
            ):
                details: Any = cause.details[0] if cause.details else {}
                code = details.get("failure_code") if isinstance(details, dict) else None
                # Recorded as failed, which releases the reservation.
                return RecordRefundInput(
                    refund_id=refund.id,
                    status=RefundStatus.FAILED,
                    failure_code=str(code or "refund_rejected"),
                    failure_message=cause.message,
                )
            raise
        return RecordRefundInput(
            refund_id=refund.id,
            status=RefundStatus.SUCCEEDED,
            provider_refund_id=result.provider_refund_id,
        )

    async def _notify(self, refund: Refund) -> None:
        workflow.set_current_details(f"Delivering the {REFUND_SUCCEEDED} webhook to the client")
        try:
            await workflow.execute_activity_method(
                PaymentActivities.notify_webhook,
                NotifyInput(
                    payment_id=refund.payment_id, event_type=REFUND_SUCCEEDED, refund_id=refund.id
                ),
                start_to_close_timeout=WEBHOOK_START_TO_CLOSE,
                schedule_to_close_timeout=WEBHOOK_BUDGET,
                retry_policy=WEBHOOK_RETRY,
                summary=f"Send the {REFUND_SUCCEEDED} webhook",
            )
        except ActivityError:
            # The money moved either way; the client can still read the payment.
            workflow.logger.error(
                "Webhook undeliverable within its budget", extra={"refund_id": refund.id}
            )

    @workflow.update(name=AWAIT_REFUND_UPDATE)
    async def await_refund(self, request: RefundAttachRequest) -> RefundAttachResult:
        await workflow.wait_condition(lambda: self._refund is not None or self._refusal is not None)
        if self._refund is None:
            raise _refused(self._refusal)
        return RefundAttachResult(
            refund=self._refund, replayed=request.request_id != self._input.origin_request_id
        )

    @await_refund.validator
    def _validate_same_request(self, request: RefundAttachRequest) -> None:
        # Rejected updates leave no trace in the history: a conflicting body changes nothing.
        if request.request_fingerprint != self._input.request_fingerprint:
            raise ApplicationError(
                "this idempotency key was already used with a different request",
                type=ErrorType.IDEMPOTENCY_KEY_REUSED,
            )

    @workflow.query(name="status")
    def status(self) -> Refund | None:
        if self._refund is not None:
            return self._refund
        return None if self._opened is None else self._opened.refund
