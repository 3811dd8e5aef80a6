"""Result cache of the OCR and embedding workers, keyed by content checksum and engine.

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "result_cache",
        sa.Column("kind", sa.Text, primary_key=True),
        sa.Column("checksum", sa.Text, primary_key=True),
        sa.Column("engine", sa.Text, primary_key=True),
        sa.Column("result", JSONB, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False,
                  server_default=sa.func.now()),
    )


def downgrade() -> None:
    op.drop_table("result_cache")
