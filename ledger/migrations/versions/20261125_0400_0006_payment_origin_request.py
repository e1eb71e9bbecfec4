"""The request that started a payment's run, on its ledger row.

The API's bounded wait can run out while the engine is busy (a storm). The row then
proves the run exists and names its original request, so the API answers 202 (and
whether this request is a replay) from the ledger instead of asking Temporal,
which is busiest exactly then. NULL for rows written before this column.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-25 04:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("payments", sa.Column("origin_request_id", sa.String(64), nullable=True))


def downgrade() -> None:
    op.drop_column("payments", "origin_request_id")
