"""Every image's journey, kept apart from the outbox (which the janitor empties), and the
trace each image's events continue.

Revision ID: image_0003
Revises: image_0002
"""

from alembic import op

revision = "image_0003"
down_revision = "image_0002"
branch_labels = None
depends_on = None

HISTORY = """
CREATE TABLE image_event (
    event_id uuid PRIMARY KEY,
    image_id uuid NOT NULL,
    org_id text NOT NULL,
    version bigint NOT NULL,
    type text NOT NULL,
    state text NOT NULL,
    attempts integer NOT NULL,
    last_error text,
    traceparent text NOT NULL,
    occurred_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX image_event_image_idx ON image_event (image_id, version);
ALTER TABLE image ADD COLUMN trace_id text;
"""


def upgrade() -> None:
    op.execute(HISTORY)


def downgrade() -> None:
    op.execute("DROP TABLE image_event")
    op.execute("ALTER TABLE image DROP COLUMN trace_id")
