"""Webhook secret rotation: a replaced secret stays valid until its overlap ends.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-25 02:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_now = sa.text("now()")


def upgrade() -> None:
    op.create_table(
        "previous_webhook_secrets",
        sa.Column("id", sa.BigInteger(), primary_key=True, autoincrement=True),
        sa.Column("client_id", sa.String(40), sa.ForeignKey("api_clients.id"), nullable=False),
        sa.Column("secret", sa.Text(), nullable=False),
        sa.Column("retired_at", sa.DateTime(timezone=True), server_default=_now, nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index(
        "ix_previous_webhook_secrets_client_expires",
        "previous_webhook_secrets",
        ["client_id", "expires_at"],
    )


def downgrade() -> None:
    op.drop_table("previous_webhook_secrets")
