"""Record the pgoutput frames `tests/test_pgoutput.py` decodes, from a real PostgreSQL.

Run from the repository root, against the local stack's server (`make up`):

    set -a; . .outbox/env; set +a
    .venv/bin/python tests/data/pgoutput/record.py

It connects with OUTBOX_DATABASE_URL (a role that may create databases and replication
slots), creates the database `pgoutput_frames`, the tables of every case, a publication
of them, and the outbox schema `pgoutput_frames` (the migrations, in message mode, so
`outbox_emit` writes a real outbox message), then a logical slot with the pgoutput plugin.
For each case it runs the case's transactions, reads the frames with
`pg_logical_slot_peek_binary_changes(slot, NULL, NULL, 'proto_version', '1',
'publication_names', <pub>, 'messages', 'true')` (each row's `data` is one pgoutput
message, the bytes the relay's replication stream delivers) and moves the slot past them,
so the next case's frames start afresh (a new decoding session: every table's Relation
frame is sent again before its first row). The slot and the database are dropped at the
end, also after a failure.

Each case is written to `<case>.json`: the statements, the server's version, when it was
recorded, the tables' oids, and the frames in stream order (LSN and xid as the function
returned them, the frame as hex). The session runs with TimeZone UTC, so timestamptz values
are written as `... +00`.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
from psycopg import sql
from sqlalchemy.engine import make_url

from outbox.migrate import migrate
from outbox.pg_names import message_prefix, slot_name
from outbox.settings import Settings

DATABASE = "pgoutput_frames"
SCHEMA = "pgoutput_frames"  # the outbox's schema; the cases' tables are in public
SLOT = slot_name(SCHEMA)  # the name `outbox_emit` requires to exist in message mode
PUBLICATION = "frames_pub"
OUT = Path(__file__).resolve().parent

# 400 md5 hex digests: 12800 bytes pglz cannot shrink below the TOAST threshold (2 kB);
# the column is also STORAGE EXTERNAL, so it is stored out of line, uncompressed.
MD5_CHAIN = "(select string_agg(md5(i::text), '' order by i) from generate_series(1, 400) i)"

SETUP = [
    "create table frames_events (id text primary key, n int, doc jsonb, at timestamptz)",
    "create table frames_nulls (id int primary key, a text, b jsonb, c timestamptz, d text)",
    "create table frames_toast (id int primary key, note text, big text)",
    "alter table frames_toast alter column big set storage external",
    "alter table frames_toast replica identity default",
    "create table frames_evolving (id int primary key, a text)",
    "create table frames_flush (n serial)",
    f"create publication {PUBLICATION} for table frames_events, frames_nulls, frames_toast, "
    "frames_evolving",
]


@dataclass(frozen=True)
class Case:
    """One recording: its transactions (each a list of statements, committed together) and
    the tables whose oids the test checks Relation frames against."""

    name: str
    transactions: list[list[str]]
    tables: list[str] = field(default_factory=list)


CASES = [
    Case("inserts", [[
        "insert into frames_events values ('a-1', 42, '{\"b\": [1, 2.50], \"a\": \"x\"}', "
        "'2024-05-06 07:08:09.123456+02')",
        "insert into frames_events values ('é ✓', -7, '\"just a string\"', "
        "'2024-02-29 23:59:59+00')",
    ]], ["frames_events"]),
    Case("nulls", [[
        "insert into frames_nulls values (1, NULL, NULL, NULL, '')",
    ]], ["frames_nulls"]),
    Case("toast", [
        [f"insert into frames_toast values (1, 'first', {MD5_CHAIN})"],
        ["update frames_toast set note = 'second' where id = 1"],
    ], ["frames_toast"]),
    Case("relation_change", [
        ["insert into frames_evolving values (1, 'one')"],
        ["alter table frames_evolving add column b int"],
        ["insert into frames_evolving values (2, 'two', 2)"],
    ], ["frames_evolving"]),
    Case("messages", [
        ["select pg_logical_emit_message(true, 'p', 'content')",
         "select pg_logical_emit_message(true, 'p2', '\\x00ff00'::bytea)"],
        ["select pg_logical_emit_message(false, 'p', 'content')"],
    ]),
    Case("outbox_message", [
        [f"select {SCHEMA}.outbox_emit('order', 'o-1', 'order.created', "
         "'{\"total\": 12.50, \"items\": [1, 2]}', 3, 'org-9', "
         "'{\"traceparent\": \"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01\"}')"],
        [f"select pg_logical_emit_message(false, '{message_prefix(SCHEMA)}', 'x')"],
    ]),
]


def _connect(url: str, dbname: str) -> psycopg.Connection:
    dsn = make_url(url).set(drivername="postgresql", database=dbname)
    return psycopg.connect(dsn.render_as_string(hide_password=False), autocommit=True,
                           options="-c TimeZone=UTC -c DateStyle=ISO")


def _record(conn: psycopg.Connection, case: Case) -> dict:
    results = []
    for statements in case.transactions:
        with conn.transaction():
            for statement in statements:
                cur = conn.execute(statement)
                if cur.description is not None:
                    results.append(str(cur.fetchone()[0]))
    # The function decodes only flushed WAL, and a non-transactional message is not flushed
    # when written: a commit that wrote WAL flushes it (a row of a table outside the
    # publication, so the transaction sends no frame).
    conn.execute("insert into frames_flush values (default)")
    upto = conn.execute("select pg_current_wal_lsn()").fetchone()[0]
    rows = conn.execute(
        "select lsn::text, xid::text::bigint, data from pg_logical_slot_peek_binary_changes("
        "%s, NULL, NULL, 'proto_version', '1', 'publication_names', %s, 'messages', 'true')",
        (SLOT, PUBLICATION)).fetchall()
    conn.execute("select pg_replication_slot_advance(%s, %s)", (SLOT, upto))
    oids = {t: conn.execute("select %s::regclass::oid", (t,)).fetchone()[0]
            for t in case.tables}
    return {
        "case": case.name,
        "recorded_with": "tests/data/pgoutput/record.py",
        "server_version": conn.info.parameter_status("server_version"),
        "recorded_at": time.time(),
        "transactions": case.transactions,
        "results": results,
        "relation_oids": oids,
        "frames": [{"lsn": lsn, "xid": xid, "hex": bytes(data).hex()}
                   for lsn, xid, data in rows],
    }


def main() -> None:
    """Record every case into this directory."""
    url = os.environ.get("OUTBOX_DATABASE_URL")
    if not url:
        sys.exit("OUTBOX_DATABASE_URL is not set: source .outbox/env first")
    admin_db = make_url(url).database
    with _connect(url, admin_db) as admin:
        admin.execute(sql.SQL("drop database if exists {} with (force)").format(
            sql.Identifier(DATABASE)))
        admin.execute(sql.SQL("create database {} template template0 encoding 'UTF8'").format(
            sql.Identifier(DATABASE)))
    try:
        frames_url = make_url(url).set(database=DATABASE).render_as_string(hide_password=False)
        migrate(Settings(database_url=frames_url, db_schema=SCHEMA, emit_mode="message"),
                only="outbox")
        with _connect(url, DATABASE) as conn:
            for statement in SETUP:
                conn.execute(statement)
            conn.execute("select pg_create_logical_replication_slot(%s, 'pgoutput')", (SLOT,))
            try:
                for case in CASES:
                    recording = _record(conn, case)
                    path = OUT / f"{case.name}.json"
                    path.write_text(json.dumps(recording, indent=1, ensure_ascii=False) + "\n")
                    print(f"{path.name}: {len(recording['frames'])} frames")
            finally:
                conn.execute("select pg_drop_replication_slot(%s)", (SLOT,))
    finally:
        with _connect(url, admin_db) as admin:
            admin.execute(sql.SQL("drop database if exists {} with (force)").format(
                sql.Identifier(DATABASE)))


if __name__ == "__main__":
    main()
