"""The database itself refuses an unbalanced payment: entries must sum to zero at commit.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-24 05:00:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute(
        """
        CREATE FUNCTION ledger_entries_must_balance() RETURNS trigger
        LANGUAGE plpgsql AS $$
        BEGIN
            IF (SELECT COALESCE(SUM(amount), 0) FROM ledger_entries
                WHERE payment_id = NEW.payment_id) <> 0 THEN
                RAISE EXCEPTION 'ledger entries of payment % do not sum to zero', NEW.payment_id
                    USING ERRCODE = 'check_violation';
            END IF;
            RETURN NULL;
        END $$;
        """
    )
    # Deferred to commit: a transaction posts both legs before the sum is checked.
    op.execute(
        """
        CREATE CONSTRAINT TRIGGER ledger_entries_balanced
        AFTER INSERT OR UPDATE ON ledger_entries
        DEFERRABLE INITIALLY DEFERRED
        FOR EACH ROW EXECUTE FUNCTION ledger_entries_must_balance();
        """
    )


def downgrade() -> None:
    op.execute("DROP TRIGGER ledger_entries_balanced ON ledger_entries")
    op.execute("DROP FUNCTION ledger_entries_must_balance()")
