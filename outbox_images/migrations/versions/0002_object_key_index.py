"""An index on the object key: the audit merges the bucket's listing with the rows by key.

Revision ID: image_0002
Revises: image_0001
"""

from alembic import op

revision = "image_0002"
down_revision = "image_0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("CREATE INDEX image_object_key_idx ON image (object_key)")


def downgrade() -> None:
    op.execute("DROP INDEX image_object_key_idx")
