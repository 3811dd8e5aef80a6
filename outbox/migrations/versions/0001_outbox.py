"""The outbox, the consumers' tracking records, the relay's slot state and wake-up trigger.

Revision ID: 0001
Revises:
"""

from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

# Column names follow Debezium's outbox event router (id, aggregatetype/aggregateid, type,
# payload) in snake case; `seq` and `published_at` serve the polling relay.
OUTBOX = """
CREATE TABLE outbox (
    id uuid PRIMARY KEY,
    seq bigint GENERATED ALWAYS AS IDENTITY NOT NULL UNIQUE,
    aggregate_type text NOT NULL,
    aggregate_id text NOT NULL,
    type text NOT NULL,
    aggregate_version bigint,
    org_id text,
    payload jsonb NOT NULL,
    headers jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_at timestamptz NOT NULL DEFAULT now(),
    published_at timestamptz
);
CREATE INDEX outbox_unpublished_idx ON outbox (seq) WHERE published_at IS NULL;
CREATE INDEX outbox_published_at_idx ON outbox (published_at) WHERE published_at IS NOT NULL;
"""

# A DB-writing consumer records (consumer, event id) in the transaction of its result, so a
# redelivered event has no second effect.
PROCESSED_EVENT = """
CREATE TABLE processed_event (
    consumer text NOT NULL,
    event_id uuid NOT NULL,
    processed_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, event_id)
);
"""

# The logical relay's own record of its slot (WAL positions as integers): when it was made
# and whether the rows from before it were backfilled, what Kafka acknowledged last, and
# the publication it was made for. The slot's confirmed position never passes `acked_lsn`,
# which tells a foreign or recreated slot apart from the relay's own.
RELAY_SLOT = """
CREATE TABLE relay_slot (
    slot_name text PRIMARY KEY,
    consistent_lsn bigint NOT NULL,
    backfilled_at timestamptz,
    acked_lsn bigint NOT NULL,
    acked_commit_at timestamptz,
    acked_seq bigint NOT NULL DEFAULT 0,
    publication_fingerprint text NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);
"""

# Relays LISTEN on outbox_<schema> (outbox.pg_names.notify_channel); NOTIFY is delivered at
# commit, so a relay wakes exactly when there is something committed to read.
# Statement-level: one notification per insert statement.
NOTIFY = """
CREATE FUNCTION outbox_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('outbox_' || TG_TABLE_SCHEMA, '');
    RETURN NULL;
END $$;
CREATE TRIGGER outbox_notify AFTER INSERT ON outbox
FOR EACH STATEMENT EXECUTE FUNCTION outbox_notify();
"""


def upgrade() -> None:
    for ddl in (OUTBOX, PROCESSED_EVENT, RELAY_SLOT, NOTIFY):
        op.execute(ddl)


def downgrade() -> None:
    op.execute("DROP TRIGGER IF EXISTS outbox_notify ON outbox")
    op.execute("DROP FUNCTION IF EXISTS outbox_notify()")
    op.execute("DROP TABLE relay_slot, processed_event, outbox")
