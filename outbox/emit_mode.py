"""The emit mode a database holds (`outbox_config`, written by `outbox migrate` from
OUTBOX_EMIT_MODE): what `outbox_emit` does, so what the commands reading the outbox table
can tell."""

from __future__ import annotations

import psycopg
from psycopg.rows import tuple_row

from outbox.pg_names import CONFIG_TABLE

# What the commands that read outbox rows say in message mode, where no row is written.
NO_ROWS_NOTE = ("this outbox emits in message mode (OUTBOX_EMIT_MODE=message): events are "
                "logical-decoding messages, never rows in the outbox table")


def stored_emit_mode(conn: psycopg.Connection) -> str:
    """"table" or "message", for the schema on the connection's search_path ("table" for a
    schema migrated before the mode was stored)."""
    cur = conn.cursor(row_factory=tuple_row)  # whatever row factory the connection has
    row = cur.execute("select to_regclass(%s) is not null", (CONFIG_TABLE,)).fetchone()
    if not row or not row[0]:
        return "table"
    found = cur.execute(f"select emit_mode from {CONFIG_TABLE}").fetchone()
    return "table" if found is None else found[0]
