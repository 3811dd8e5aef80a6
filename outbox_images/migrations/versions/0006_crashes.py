"""Crashes per image: OCR attempts that ended with no result (the worker died or hung)
are counted apart from the attempts the image failed, against a budget of their own.

Revision ID: image_0006
Revises: image_0005
"""

from alembic import op

revision = "image_0006"
down_revision = "image_0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # A constant default: no table rewrite on PostgreSQL 11+.
    op.execute("ALTER TABLE image ADD COLUMN crashes integer NOT NULL DEFAULT 0")


def downgrade() -> None:
    op.execute("ALTER TABLE image DROP COLUMN crashes")
