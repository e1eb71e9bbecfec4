"""Typed SQLAlchemy models. They stay inside repositories: no ORM object crosses an
activity or API boundary."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    DateTime,
    ForeignKey,
    Index,
    String,
    Text,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class ApiClient(Base):
    __tablename__ = "api_clients"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    webhook_url: Mapped[str | None] = mapped_column(Text)
    # Needed in clear to sign webhooks, so it lives here and never in a log or history.
    webhook_secret: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    client_id: Mapped[str] = mapped_column(ForeignKey("api_clients.id"), index=True)
    # SHA-256 of the whole key: the key is 256 random bits, so a slow hash adds nothing.
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    display_prefix: Mapped[str] = mapped_column(String(40))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class PaymentRow(Base):
    __tablename__ = "payments"
    __table_args__ = (
        # The durable judge of idempotency: outlives Temporal's retention.
        UniqueConstraint("client_id", "idempotency_key", name="uq_payments_client_key"),
        CheckConstraint("amount > 0", name="ck_payments_amount_positive"),
        CheckConstraint(
            "status IN ('processing', 'succeeded', 'failed')", name="ck_payments_status"
        ),
        Index("ix_payments_client_created_id", "client_id", "created_at", "id"),
        Index("ix_payments_client_status_created_id", "client_id", "status", "created_at", "id"),
        # The API's backlog gate counts the payments in flight several times a second.
        Index(
            "ix_payments_processing",
            "created_at",
            postgresql_where=text("status = 'processing'"),
        ),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    client_id: Mapped[str] = mapped_column(ForeignKey("api_clients.id"))
    idempotency_key: Mapped[str] = mapped_column(String(255))
    request_fingerprint: Mapped[str] = mapped_column(String(64))
    origin_request_id: Mapped[str | None] = mapped_column(String(64))
    amount: Mapped[int] = mapped_column(BigInteger)
    currency: Mapped[str] = mapped_column(String(3))
    payment_method: Mapped[str] = mapped_column(String(255))
    description: Mapped[str | None] = mapped_column(Text)
    metadata_: Mapped[dict[str, Any]] = mapped_column("metadata", JSONB, default=dict)
    status: Mapped[str] = mapped_column(String(20))
    failure_code: Mapped[str | None] = mapped_column(String(100))
    failure_message: Mapped[str | None] = mapped_column(Text)
    provider_charge_id: Mapped[str | None] = mapped_column(String(100))
    workflow_id: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    # Bumped in the transaction of every recorded change: the webhooks' sequence number.
    version: Mapped[int] = mapped_column(BigInteger, server_default="1")


class LedgerEntry(Base):
    """Double-entry: the entries of one payment always sum to zero."""

    __tablename__ = "ledger_entries"
    __table_args__ = (
        # One entry per (payment, kind, account): a replayed record cannot post twice.
        UniqueConstraint("payment_id", "entry_kind", "account", name="uq_ledger_entry"),
        CheckConstraint("amount <> 0", name="ck_ledger_amount_nonzero"),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    payment_id: Mapped[str] = mapped_column(ForeignKey("payments.id"), index=True)
    entry_kind: Mapped[str] = mapped_column(String(40))
    account: Mapped[str] = mapped_column(String(100))
    amount: Mapped[int] = mapped_column(BigInteger)
    currency: Mapped[str] = mapped_column(String(3))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class PreviousWebhookSecret(Base):
    """A replaced webhook secret, still signing (beside the new one) until ``expires_at``."""

    __tablename__ = "previous_webhook_secrets"
    __table_args__ = (
        Index("ix_previous_webhook_secrets_client_expires", "client_id", "expires_at"),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    client_id: Mapped[str] = mapped_column(ForeignKey("api_clients.id"))
    secret: Mapped[str] = mapped_column(Text)
    retired_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class RefundRow(Base):
    """A refund, reserved as ``pending`` before any money moves.

    Pending and succeeded refunds hold their amount; a trigger (migration 0003)
    refuses any row that would take a payment's refunds past its amount.
    """

    __tablename__ = "refunds"
    __table_args__ = (
        UniqueConstraint("client_id", "idempotency_key", name="uq_refunds_client_key"),
        CheckConstraint("amount > 0", name="ck_refunds_amount_positive"),
        CheckConstraint("status IN ('pending', 'succeeded', 'failed')", name="ck_refunds_status"),
        CheckConstraint(
            "reason IS NULL OR reason IN ('duplicate', 'fraudulent', 'requested_by_customer')",
            name="ck_refunds_reason",
        ),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    payment_id: Mapped[str] = mapped_column(ForeignKey("payments.id"), index=True)
    client_id: Mapped[str] = mapped_column(ForeignKey("api_clients.id"))
    idempotency_key: Mapped[str] = mapped_column(String(255))
    request_fingerprint: Mapped[str] = mapped_column(String(64))
    amount: Mapped[int] = mapped_column(BigInteger)
    currency: Mapped[str] = mapped_column(String(3))
    reason: Mapped[str | None] = mapped_column(String(40))
    status: Mapped[str] = mapped_column(String(20))
    provider_refund_id: Mapped[str | None] = mapped_column(String(100))
    failure_code: Mapped[str | None] = mapped_column(String(100))
    failure_message: Mapped[str | None] = mapped_column(Text)
    workflow_id: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
