"""What a webhook says: the event body, built from the payment as the ledger has it.

Every event carries the full current payment (refunds included) and its
``sequence``, the payment's version: bumped in the transaction of every recorded
change, so a receiver keeps the highest sequence it has seen per payment and
drops anything older, whatever order deliveries arrive in. Signing and delivery
stay in ``activities/webhooks.py``.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from domain.payments import Payment, PaymentStatus

PAYMENT_SUCCEEDED = "payment.succeeded"
PAYMENT_FAILED = "payment.failed"
REFUND_SUCCEEDED = "refund.succeeded"

EVENT_TYPES = (PAYMENT_SUCCEEDED, PAYMENT_FAILED, REFUND_SUCCEEDED)


def payment_event_type(status: PaymentStatus) -> str:
    return PAYMENT_SUCCEEDED if status is PaymentStatus.SUCCEEDED else PAYMENT_FAILED


def event_id_for(payment_id: str, event_type: str, refund_id: str | None = None) -> str:
    """Stable across retries (the ``webhook-id``), so receivers can drop a redelivery."""
    subject = payment_id.removeprefix("pay_") if refund_id is None else refund_id
    return f"evt_{subject}_{event_type.replace('.', '_')}"


def build_event(
    *, event_type: str, payment: Payment, created_at: datetime, refund_id: str | None = None
) -> dict[str, Any]:
    if event_type not in EVENT_TYPES:
        raise ValueError(f"unknown event type {event_type!r}")
    event: dict[str, Any] = {
        "id": event_id_for(payment.id, event_type, refund_id),
        "type": event_type,
        "sequence": payment.version,
        "created_at": created_at.isoformat().replace("+00:00", "Z"),
        "data": payment.public_dict(),
    }
    if refund_id is not None:
        event["refund_id"] = refund_id
    return event
