"""Listing indexes: a client's payments newest first, with or without a status filter.

``GET /v1/payments`` orders by (created_at, id) descending and pages with a
(created_at, id) cursor; these indexes serve both the order and the cursor, so a
page costs an index range scan whatever the client's history.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-25 03:00:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index("ix_payments_client_created_id", "payments", ["client_id", "created_at", "id"])
    op.create_index(
        "ix_payments_client_status_created_id",
        "payments",
        ["client_id", "status", "created_at", "id"],
    )
    op.drop_index("ix_payments_client_created", table_name="payments")


def downgrade() -> None:
    op.create_index("ix_payments_client_created", "payments", ["client_id", "created_at"])
    op.drop_index("ix_payments_client_status_created_id", table_name="payments")
    op.drop_index("ix_payments_client_created_id", table_name="payments")
