"""The ETag of the object as it was verified: OCR reads that object or none.

Revision ID: image_0004
Revises: image_0003
"""

from alembic import op

revision = "image_0004"
down_revision = "image_0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("ALTER TABLE image ADD COLUMN object_etag text")


def downgrade() -> None:
    op.execute("ALTER TABLE image DROP COLUMN object_etag")
