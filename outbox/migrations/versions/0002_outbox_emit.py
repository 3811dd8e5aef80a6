"""`outbox_emit(...)`: emit from any language through SQL; the deployment's emit mode.

Revision ID: 0002
Revises: 0001
"""

from alembic import op
from sqlalchemy import text

from outbox.pg_names import CONFIG_TABLE, OUTBOX_TABLE, message_prefix, slot_name

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

# One row; `outbox migrate` writes OUTBOX_EMIT_MODE into it (outbox/migrate.py), so the SQL
# function knows the mode without its caller setting anything.
CONFIG = """
CREATE TABLE {config} (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    emit_mode text NOT NULL DEFAULT 'table' CHECK (emit_mode IN ('table', 'message'))
);
INSERT INTO {config} DEFAULT VALUES;
"""

# SECURITY DEFINER: an application role granted only EXECUTE (and USAGE on the schema) can
# emit, without INSERT on the outbox or EXECUTE on pg_logical_emit_message; the fixed
# search_path (pg_catalog, then pg_temp) and fully qualified names keep a caller's
# search_path from redirecting anything. EXECUTE is revoked from PUBLIC: emitting is granted.
# Every name is the function's own (`outbox_emit.type`) because the parameters carry the
# column names, for named notation.
FUNCTION = r"""
CREATE FUNCTION {schema}.outbox_emit(
    aggregate_type text, aggregate_id text, type text, payload jsonb,
    aggregate_version bigint DEFAULT NULL, org_id text DEFAULT NULL, headers jsonb DEFAULT NULL)
RETURNS uuid
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    event_id uuid := pg_catalog.gen_random_uuid();
    hdrs jsonb := outbox_emit.headers;
    trace text;
    mode text;
BEGIN
    IF outbox_emit.aggregate_type IS NULL OR outbox_emit.aggregate_type = '' THEN
        RAISE EXCEPTION 'outbox_emit: aggregate_type must be a non-empty text'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF outbox_emit.aggregate_id IS NULL OR outbox_emit.aggregate_id = '' THEN
        RAISE EXCEPTION 'outbox_emit: aggregate_id must be a non-empty text'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF outbox_emit.type IS NULL OR outbox_emit.type = '' THEN
        RAISE EXCEPTION 'outbox_emit: type must be a non-empty text'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF outbox_emit.payload IS NULL THEN
        RAISE EXCEPTION 'outbox_emit: payload must not be NULL (use ''{{}}''::jsonb for none)'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF outbox_emit.aggregate_version < 0 THEN
        RAISE EXCEPTION 'outbox_emit: aggregate_version must not be negative, got %',
            outbox_emit.aggregate_version USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF hdrs IS NULL THEN
        hdrs := '{{}}'::jsonb;
    ELSIF pg_catalog.jsonb_typeof(hdrs) <> 'object' THEN
        RAISE EXCEPTION 'outbox_emit: headers must be a JSON object, got %',
            pg_catalog.jsonb_typeof(hdrs) USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- Explicit headers win; then the caller's trace (SET LOCAL outbox.traceparent); then a
    -- new trace, as the Python emit makes one.
    IF NOT hdrs ? 'traceparent' THEN
        trace := NULLIF(pg_catalog.current_setting('outbox.traceparent', true), '');
        IF trace IS NULL THEN
            trace := '00-' || pg_catalog.replace(pg_catalog.gen_random_uuid()::text, '-', '')
                || '-' || pg_catalog.left(pg_catalog.replace(
                    pg_catalog.gen_random_uuid()::text, '-', ''), 16) || '-01';
        END IF;
        hdrs := hdrs || pg_catalog.jsonb_build_object('traceparent', trace);
    END IF;
    trace := hdrs ->> 'traceparent';
    -- W3C trace context: version ff, an all-zero trace id or parent id are invalid.
    IF trace IS NULL OR trace !~ '^[0-9a-f]{{2}}-[0-9a-f]{{32}}-[0-9a-f]{{16}}-[0-9a-f]{{2}}$'
            OR pg_catalog.left(trace, 2) = 'ff'
            OR pg_catalog.substr(trace, 4, 32) = pg_catalog.repeat('0', 32)
            OR pg_catalog.substr(trace, 37, 16) = pg_catalog.repeat('0', 16) THEN
        RAISE EXCEPTION 'outbox_emit: malformed traceparent %', pg_catalog.quote_literal(trace)
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'expected 00-<32 hex trace id>-<16 hex parent id>-<2 hex flags>';
    END IF;

    SELECT c.emit_mode INTO mode FROM {schema}.{config} c;
    IF mode = 'message' THEN
        -- A message written while no slot exists is lost for good (a new slot sees only
        -- later WAL, and there is no row to backfill): emit only when the slot exists.
        PERFORM pg_catalog.pg_logical_emit_message(true, {prefix},
            pg_catalog.jsonb_build_object(
                'v', 1, 'id', event_id, 'aggregate_type', outbox_emit.aggregate_type,
                'aggregate_id', outbox_emit.aggregate_id, 'type', outbox_emit.type,
                'aggregate_version', outbox_emit.aggregate_version,
                'org_id', outbox_emit.org_id, 'headers', hdrs,
                'occurred_at', pg_catalog.to_char(pg_catalog.now() AT TIME ZONE 'UTC',
                                                  'YYYY-MM-DD HH24:MI:SS.US') || '+00'
            )::text || E'\n' || outbox_emit.payload::text)
        FROM pg_catalog.pg_replication_slots s
        WHERE s.slot_name = {slot} AND s.wal_status IS DISTINCT FROM 'lost';
        IF NOT FOUND THEN
            RAISE EXCEPTION 'outbox_emit: message mode needs the replication slot %, which '
                'does not exist or was invalidated: start the logical relay first (a message '
                'written without a slot would be lost)', {slot}
                USING ERRCODE = 'object_not_in_prerequisite_state';
        END IF;
    ELSE
        INSERT INTO {schema}.{outbox} (id, aggregate_type, aggregate_id, type,
                                        aggregate_version, org_id, payload, headers)
        VALUES (event_id, outbox_emit.aggregate_type, outbox_emit.aggregate_id,
                outbox_emit.type, outbox_emit.aggregate_version, outbox_emit.org_id,
                outbox_emit.payload, hdrs);
    END IF;
    RETURN event_id;
END
$fn$;
REVOKE EXECUTE ON FUNCTION {schema}.outbox_emit(text, text, text, jsonb, bigint, text, jsonb)
    FROM PUBLIC;
"""


def _quoted(conn, sql: str, value: str) -> str:
    return conn.execute(text(sql), {"v": value}).scalar_one()


def upgrade() -> None:
    conn = op.get_bind()
    schema = conn.execute(text("select current_schema()")).scalar_one()
    names = {
        "schema": _quoted(conn, "select quote_ident(:v)", schema),
        "config": CONFIG_TABLE,
        "outbox": OUTBOX_TABLE,
        "prefix": _quoted(conn, "select quote_literal(:v)", message_prefix(schema)),
        "slot": _quoted(conn, "select quote_literal(:v)", slot_name(schema)),
    }
    op.execute(CONFIG.format(**names))
    op.execute(FUNCTION.format(**names))


def downgrade() -> None:
    op.execute("DROP FUNCTION IF EXISTS outbox_emit(text, text, text, jsonb, bigint, text, "
               "jsonb)")
    op.execute(f"DROP TABLE IF EXISTS {CONFIG_TABLE}")
