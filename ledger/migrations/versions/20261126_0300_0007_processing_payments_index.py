"""Processing payments, counted cheaply: the API's backlog gate reads this count a few
times a second (api/backlog.py), so it must cost an index scan over the payments in
flight, not a scan of every payment ever made.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-26 03:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index(
        "ix_payments_processing",
        "payments",
        ["created_at"],
        postgresql_where=sa.text("status = 'processing'"),
    )


def downgrade() -> None:
    op.drop_index("ix_payments_processing", table_name="payments")
