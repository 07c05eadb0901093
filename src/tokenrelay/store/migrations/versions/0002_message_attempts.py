"""Messages record their upstream attempts (issue 15: accounting).

Each assistant message keeps, as JSON, every upstream request its answer made: route,
status, time, and usage with its source (provider, counted or estimated).

Revision ID: 0002_message_attempts
Revises: 0001
Create Date: 2026-12-05
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002_message_attempts"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("messages") as batch:
        batch.add_column(sa.Column("attempts", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("messages") as batch:
        batch.drop_column("attempts")
