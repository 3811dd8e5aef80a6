"""Baseline: the outbox, the image resource, consumer tracking, the relay wake-up trigger.

The baseline is created from the models; later revisions use explicit operations.

Revision ID: 0001
Revises:
"""

from alembic import op
from sqlalchemy.engine import Connection

from outbox.models import metadata

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

# Relays LISTEN on outbox_<schema>; NOTIFY is delivered at commit, so a relay wakes exactly
# when there is something committed to read. Statement-level: one notification per insert.
NOTIFY_FUNCTION = """
CREATE FUNCTION outbox_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('outbox_' || TG_TABLE_SCHEMA, '');
    RETURN NULL;
END $$;
"""
NOTIFY_TRIGGER = """
CREATE TRIGGER outbox_notify AFTER INSERT ON outbox
FOR EACH STATEMENT EXECUTE FUNCTION outbox_notify();
"""


BASELINE = ("outbox", "image", "processed_event")


def upgrade() -> None:
    bind: Connection = op.get_bind()
    metadata.create_all(bind, tables=[metadata.tables[name] for name in BASELINE])
    op.execute(NOTIFY_FUNCTION)
    op.execute(NOTIFY_TRIGGER)


def downgrade() -> None:
    op.execute("DROP TRIGGER IF EXISTS outbox_notify ON outbox")
    op.execute("DROP FUNCTION IF EXISTS outbox_notify()")
    metadata.drop_all(op.get_bind(), tables=[metadata.tables[name] for name in BASELINE])
