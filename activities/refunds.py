"""The activities of a refund: reserve it, refund at the provider, record the outcome.

The webhook goes through the payment's ``notify_webhook`` activity: one place signs
and delivers every event.
"""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from temporalio import activity
from temporalio.exceptions import ApplicationError, ApplicationErrorCategory

from activities.provider_client import (
    ProviderClient,
    ProviderDeclined,
    ProviderInvalidRequest,
    ProviderUnavailable,
)
from config.logging import add_to_attempt_line
from domain.payments import DeclineDetails, ErrorType
from domain.refunds import (
    REFUND_REFUSED_ERROR,
    REFUND_REJECTED_BY_PROVIDER_ERROR,
    OpenRefundInput,
    OpenRefundResult,
    ProviderRefundInput,
    ProviderRefundResult,
    RecordRefundInput,
    Refund,
    RefundRefusalDetails,
)
from ledger.repositories import RefundRepository


class RefundActivities:
    def __init__(
        self, sessions: async_sessionmaker[AsyncSession], provider: ProviderClient
    ) -> None:
        self._sessions = sessions
        self._provider = provider

    @activity.defn(name="open_refund")
    async def open_refund(self, input: OpenRefundInput) -> OpenRefundResult:
        """Reserve the refund (the API has normally done so already: then this finds it)."""
        async with self._sessions() as session, session.begin():
            reservation = await RefundRepository(session).reserve(input.refund)
        if reservation.refund is None or reservation.refusal is not None:
            assert reservation.refusal is not None
            raise ApplicationError(
                f"refund refused: {reservation.refusal}",
                RefundRefusalDetails(
                    refusal=reservation.refusal,
                    payment_status=reservation.payment_status,
                    amount_refundable=reservation.amount_refundable,
                ),
                type=REFUND_REFUSED_ERROR,
                non_retryable=True,
                category=ApplicationErrorCategory.BENIGN,
            )
        if reservation.provider_charge_id is None:
            # A succeeded payment always has its charge id; without it nothing can be refunded.
            raise ApplicationError(
                f"payment {reservation.refund.payment_id} has no provider charge id",
                type=ErrorType.INVALID_PAYMENT_REQUEST,
                non_retryable=True,
            )
        return OpenRefundResult(
            refund=reservation.refund, provider_charge_id=reservation.provider_charge_id
        )

    @activity.defn(name="refund_at_provider")
    async def refund_at_provider(self, input: ProviderRefundInput) -> ProviderRefundResult:
        try:
            refund = await self._provider.refund(
                # The refund's id is the provider's idempotency key: a retry finds the first.
                idempotency_key=input.refund_id,
                charge_id=input.provider_charge_id,
                amount=input.amount,
            )
        except (ProviderInvalidRequest, ProviderDeclined) as exc:
            raise ApplicationError(
                exc.message,
                DeclineDetails(exc.code, exc.message),
                type=REFUND_REJECTED_BY_PROVIDER_ERROR,
                non_retryable=True,
                category=ApplicationErrorCategory.BENIGN,
            ) from exc
        except ProviderUnavailable as exc:
            raise ApplicationError(str(exc), type=ErrorType.PROVIDER_UNAVAILABLE) from exc
        add_to_attempt_line(refund_id=input.refund_id, provider_refund_id=refund.id)
        return ProviderRefundResult(provider_refund_id=refund.id)

    @activity.defn(name="record_refund_outcome")
    async def record_refund_outcome(self, input: RecordRefundInput) -> Refund:
        async with self._sessions() as session, session.begin():
            refund = await RefundRepository(session).record_outcome(input)
        add_to_attempt_line(refund_id=refund.id, status=str(refund.status))
        return refund
