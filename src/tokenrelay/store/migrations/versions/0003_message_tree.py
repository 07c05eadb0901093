"""Answer versions: messages form a tree, the conversation remembers the branch shown.

Revision ID: 0003
Revises: 0002_message_attempts
Create Date: 2026-12-05

``messages.parent_id`` is the message a message follows (NULL for a first message); two
children of one parent are two versions of that turn (a regenerate, an edit-and-resend).
``conversations.active_id`` is the last message of the branch shown. Existing
conversations are linear: each message's parent is the one before it by ``seq``, and the
active branch ends at the last one, so nothing is lost or reordered.

Released migrations are never edited: add ``0004_...`` instead.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002_message_attempts"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Plain ADD COLUMN (nullable, no default): no table copy on either database. Reads
    # load a conversation's messages by conversation_id, so parent_id needs no index.
    op.add_column("messages", sa.Column("parent_id", sa.String(), nullable=True))
    op.add_column("conversations", sa.Column("active_id", sa.String(), nullable=True))
    op.execute(
        "UPDATE messages SET parent_id = ("
        " SELECT prev.id FROM messages AS prev"
        " WHERE prev.conversation_id = messages.conversation_id AND prev.seq < messages.seq"
        " ORDER BY prev.seq DESC LIMIT 1)"
    )
    op.execute(
        "UPDATE conversations SET active_id = ("
        " SELECT newest.id FROM messages AS newest"
        " WHERE newest.conversation_id = conversations.id"
        " ORDER BY newest.seq DESC LIMIT 1)"
    )


def downgrade() -> None:
    op.drop_column("conversations", "active_id")
    op.drop_column("messages", "parent_id")
