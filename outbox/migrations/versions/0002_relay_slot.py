"""Relay slot state: the rows written before a slot existed, and whether they were published.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "relay_slot",
        sa.Column("slot_name", sa.Text, primary_key=True),
        # Highest outbox seq visible right after the slot reached its consistent point:
        # rows above it committed later and are in the slot's stream.
        sa.Column("backfill_upto_seq", sa.BigInteger, nullable=False),
        sa.Column("backfilled_at", sa.DateTime(timezone=True)),
    )


def downgrade() -> None:
    op.drop_table("relay_slot")
