"""The publication of the outbox's inserts, made by the owner (the relay needs no ownership).

Revision ID: 0003
Revises: 0002
"""

from alembic import op
from sqlalchemy import text

from outbox.pg_names import publication_name
from outbox.publication import ensure_publication_sql

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # An installation whose relay made the publication already keeps it (the statement
    # only repairs what is missing).
    schema = op.get_bind().execute(text("select current_schema()")).scalar_one()
    op.execute(ensure_publication_sql(schema))


def downgrade() -> None:
    schema = op.get_bind().execute(text("select current_schema()")).scalar_one()
    op.execute(f'DROP PUBLICATION IF EXISTS "{publication_name(schema)}"')
