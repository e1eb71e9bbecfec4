"""Refunds: reserved before money moves, never more than the payment; payments get a version.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-25 01:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_now = sa.text("now()")


def upgrade() -> None:
    # The webhooks' sequence number: bumped in the transaction of every recorded change.
    op.add_column(
        "payments",
        sa.Column("version", sa.BigInteger(), nullable=False, server_default=sa.text("1")),
    )
    op.create_table(
        "refunds",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("payment_id", sa.String(40), sa.ForeignKey("payments.id"), nullable=False),
        sa.Column("client_id", sa.String(40), sa.ForeignKey("api_clients.id"), nullable=False),
        sa.Column("idempotency_key", sa.String(255), nullable=False),
        sa.Column("request_fingerprint", sa.String(64), nullable=False),
        sa.Column("amount", sa.BigInteger(), nullable=False),
        sa.Column("currency", sa.String(3), nullable=False),
        sa.Column("reason", sa.String(40)),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("provider_refund_id", sa.String(100)),
        sa.Column("failure_code", sa.String(100)),
        sa.Column("failure_message", sa.Text()),
        sa.Column("workflow_id", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=_now, nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=_now, nullable=False),
        sa.UniqueConstraint("client_id", "idempotency_key", name="uq_refunds_client_key"),
        sa.CheckConstraint("amount > 0", name="ck_refunds_amount_positive"),
        sa.CheckConstraint(
            "status IN ('pending', 'succeeded', 'failed')", name="ck_refunds_status"
        ),
        sa.CheckConstraint(
            "reason IS NULL OR reason IN ('duplicate', 'fraudulent', 'requested_by_customer')",
            name="ck_refunds_reason",
        ),
    )
    op.create_index("ix_refunds_payment_id", "refunds", ["payment_id"])
    # The last line of defence, whatever the code above does: a refund that is not
    # failed must belong to a succeeded payment and fit in what remains of it. The
    # payment row is locked first, so concurrent refunds of one payment are checked
    # one after the other.
    op.execute(
        """
        CREATE FUNCTION refunds_must_fit_payment() RETURNS trigger
        LANGUAGE plpgsql AS $$
        DECLARE
            payment_status text;
            payment_amount bigint;
            held bigint;
        BEGIN
            IF NEW.status = 'failed' THEN
                RETURN NEW;
            END IF;
            SELECT status, amount INTO payment_status, payment_amount
                FROM payments WHERE id = NEW.payment_id FOR UPDATE;
            IF payment_status IS DISTINCT FROM 'succeeded' THEN
                RAISE EXCEPTION 'payment % is not refundable (status %)',
                    NEW.payment_id, payment_status USING ERRCODE = 'check_violation';
            END IF;
            SELECT COALESCE(SUM(amount), 0) INTO held FROM refunds
                WHERE payment_id = NEW.payment_id AND status <> 'failed' AND id <> NEW.id;
            IF held + NEW.amount > payment_amount THEN
                RAISE EXCEPTION 'refunds of payment % would exceed its amount (% + % > %)',
                    NEW.payment_id, held, NEW.amount, payment_amount
                    USING ERRCODE = 'check_violation';
            END IF;
            RETURN NEW;
        END $$;
        """
    )
    op.execute(
        """
        CREATE TRIGGER refunds_fit_payment
        BEFORE INSERT OR UPDATE ON refunds
        FOR EACH ROW EXECUTE FUNCTION refunds_must_fit_payment();
        """
    )


def downgrade() -> None:
    op.execute("DROP TRIGGER refunds_fit_payment ON refunds")
    op.execute("DROP FUNCTION refunds_must_fit_payment()")
    op.drop_table("refunds")
    op.drop_column("payments", "version")
