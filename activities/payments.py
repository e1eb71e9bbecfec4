"""The activities of a payment, grouped by the clients they need.

Each translates third-party exceptions into ``ApplicationError`` at its edge:
business outcomes are non-retryable with a stable type; anything else retries.
"""

from __future__ import annotations

from datetime import UTC, datetime

from temporalio import activity
from temporalio.exceptions import ApplicationError, ApplicationErrorCategory

from activities import metrics
from activities.provider_client import (
    ProviderClient,
    ProviderDeclined,
    ProviderInvalidRequest,
    ProviderUnavailable,
)
from activities.webhook_events import build_event
from activities.webhooks import WebhookDeliveryError, WebhookSender
from config.logging import add_to_attempt_line
from domain.payments import (
    ChargeInput,
    ChargeResult,
    DeclineDetails,
    ErrorType,
    FindChargeInput,
    FindChargeResult,
    NotifyInput,
    OpenPaymentInput,
    Payment,
    RecordOutcomeInput,
)
from ledger.payment_sql import PooledPaymentLedger

# Stripe reports most declines as code ``card_declined`` with the reason in
# ``decline_code``; clients want the reason when it is a specific one.
_GENERIC_DECLINE_CODES = {"generic_decline", "", None}


def decline_failure_code(code: str, decline_code: str | None) -> str:
    return code if decline_code in _GENERIC_DECLINE_CODES else str(decline_code)


class PaymentActivities:
    def __init__(
        self,
        ledger: PooledPaymentLedger,
        provider: ProviderClient,
        webhooks: WebhookSender,
    ) -> None:
        self._ledger = ledger
        self._provider = provider
        self._webhooks = webhooks

    @activity.defn(name="open_payment")
    async def open_payment(self, input: OpenPaymentInput) -> Payment:
        with metrics.ledger_write("open_payment"):
            stored = await self._ledger.open_payment(input.payment)
        if stored.request_fingerprint != input.payment.request_fingerprint:
            # Only reachable once Temporal has forgotten the first run: the ledger still judges.
            raise ApplicationError(
                "this idempotency key was already used with a different request",
                type=ErrorType.IDEMPOTENCY_KEY_REUSED,
                non_retryable=True,
            )
        return stored.payment

    @activity.defn(name="charge_payment")
    async def charge_payment(self, input: ChargeInput) -> ChargeResult:
        try:
            with metrics.provider_call("charge"):
                charge = await self._provider.charge(
                    idempotency_key=input.payment_id,
                    amount=input.amount,
                    currency=input.currency,
                    payment_method=input.payment_method,
                    description=input.description,
                )
        except ProviderDeclined as exc:
            raise ApplicationError(
                exc.message,
                DeclineDetails(decline_failure_code(exc.code, exc.decline_code), exc.message),
                type=ErrorType.PAYMENT_DECLINED,
                non_retryable=True,
                # An expected business outcome: logged at DEBUG, not as a worker failure.
                category=ApplicationErrorCategory.BENIGN,
            ) from exc
        except ProviderInvalidRequest as exc:
            code = "invalid_payment_method" if exc.code == "resource_missing" else exc.code
            raise ApplicationError(
                exc.message,
                DeclineDetails(code, exc.message),
                type=ErrorType.INVALID_PAYMENT_REQUEST,
                non_retryable=True,
                category=ApplicationErrorCategory.BENIGN,
            ) from exc
        except ProviderUnavailable as exc:
            raise ApplicationError(str(exc), type=ErrorType.PROVIDER_UNAVAILABLE) from exc
        add_to_attempt_line(payment_id=input.payment_id, charge_id=charge.id)
        return ChargeResult(charge_id=charge.id, status=charge.status)

    @activity.defn(name="find_charge")
    async def find_charge(self, input: FindChargeInput) -> FindChargeResult:
        """Ask the provider what became of a charge whose answer never arrived."""
        try:
            with metrics.provider_call("find_charge"):
                charge = await self._provider.find_charge(input.payment_id)
        except ProviderUnavailable as exc:
            raise ApplicationError(str(exc), type=ErrorType.PROVIDER_UNAVAILABLE) from exc
        if charge is None:
            return FindChargeResult(charge_id=None)
        return FindChargeResult(
            charge_id=charge.id, status=charge.status, failure_code=charge.failure_code
        )

    @activity.defn(name="record_outcome")
    async def record_outcome(self, input: RecordOutcomeInput) -> Payment:
        with metrics.ledger_write("record_outcome"):
            payment = await self._ledger.record_outcome(input)
        metrics.payment_recorded(payment)
        add_to_attempt_line(payment_id=payment.id, status=str(payment.status))
        return payment

    @activity.defn(name="notify_webhook")
    async def notify_webhook(self, input: NotifyInput) -> None:
        found = await self._ledger.payment_for_webhook(input.payment_id)
        if found is None:
            return
        payment, target = found
        if not target.url:
            return  # no receiver configured: nothing to deliver
        event = build_event(
            event_type=input.event_type,
            payment=payment,
            created_at=datetime.now(UTC),
            refund_id=input.refund_id,
        )
        event_id = str(event["id"])
        try:
            with metrics.webhook_delivery(event_id):
                await self._webhooks.send(
                    url=target.url, secrets=target.signing_secrets, event_id=event_id, event=event
                )
        except WebhookDeliveryError as exc:
            raise ApplicationError(str(exc), type=ErrorType.WEBHOOK_DELIVERY_FAILED) from exc
        add_to_attempt_line(payment_id=payment.id, event_type=input.event_type)
