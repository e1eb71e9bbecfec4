"""Ledger rows as domain objects, and the ledger's account names.

Shared by the ORM repositories and the plain-SQL paths (``reads``, ``payment_statements``):
their rows carry the models' attribute names, so one mapper serves them all.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from domain.payments import Payment, PaymentStatus
from domain.refunds import Refund, RefundStatus
from ledger.tables import PaymentRow, RefundRow

PROVIDER_RECEIVABLE_ACCOUNT = "provider:receivable"


def client_payable_account(client_id: str) -> str:
    return f"client:{client_id}:payable"


@dataclass(frozen=True)
class StoredPayment:
    payment: Payment
    request_fingerprint: str
    # The API request whose start created the run (None on rows older than the column).
    origin_request_id: str | None = None


@dataclass(frozen=True)
class WebhookTarget:
    url: str | None
    secret: str
    # Replaced secrets still inside their rotation overlap, newest first.
    previous_secrets: tuple[str, ...] = ()

    @property
    def signing_secrets(self) -> tuple[str, ...]:
        """Every secret a delivery is signed with: the current one first."""
        return (self.secret, *self.previous_secrets)


def isoformat_utc(value: datetime) -> str:
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


def payment_to_domain(row: PaymentRow, refunds: list[Refund] | None = None) -> Payment:
    return Payment(
        id=row.id,
        client_id=row.client_id,
        idempotency_key=row.idempotency_key,
        status=PaymentStatus(row.status),
        amount=row.amount,
        currency=row.currency,
        description=row.description,
        metadata=dict(row.metadata_ or {}),
        failure_code=row.failure_code,
        failure_message=row.failure_message,
        provider_charge_id=row.provider_charge_id,
        created_at=isoformat_utc(row.created_at),
        updated_at=isoformat_utc(row.updated_at),
        refunds=list(refunds or []),
        version=row.version,
    )


def refund_to_domain(row: RefundRow) -> Refund:
    return Refund(
        id=row.id,
        payment_id=row.payment_id,
        idempotency_key=row.idempotency_key,
        status=RefundStatus(row.status),
        amount=row.amount,
        currency=row.currency,
        reason=row.reason,
        failure_code=row.failure_code,
        failure_message=row.failure_message,
        provider_refund_id=row.provider_refund_id,
        created_at=isoformat_utc(row.created_at),
        updated_at=isoformat_utc(row.updated_at),
    )
