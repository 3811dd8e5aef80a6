"""Deleting outbox rows that no relay needs any more, in bounded chunks."""

from __future__ import annotations

import psycopg

# Poll mode needs a row until it is published. Logical mode reads the WAL, but keeps the
# rows a recreated slot may have to backfill: those within the backfill margin of the last
# acknowledged commit (see relays/slot.py).
_CONDITION = {
    "poll": "published_at < now() - make_interval(secs => %(age)s)",
    "logical": "created_at < now() - make_interval(secs => %(age)s) and created_at < "
               "(select acked_commit_at - make_interval(secs => %(margin)s) from relay_slot"
               " where slot_name = %(slot)s)",
}


def purge_processed_events(conn: psycopg.Connection, retention_s: float,
                           chunk: int = 10_000) -> int:
    """Delete tracking records older than `retention_s`, in chunks; return how many."""
    total = 0
    while True:
        deleted = conn.execute(
            "delete from processed_event where ctid in (select ctid from processed_event"
            " where processed_at < now() - make_interval(secs => %s) limit %s)",
            (retention_s, chunk)).rowcount
        total += deleted
        if deleted < chunk:
            return total


def purge_outbox(conn: psycopg.Connection, mode: str, retention_s: float, *, slot: str,
                 margin_s: float, chunk: int = 10_000) -> int:
    """Delete old rows (up to `chunk` per statement, until none is left); return how many."""
    sql = (f"delete from outbox where id in (select id from outbox where {_CONDITION[mode]} "
           "limit %(chunk)s)")
    params = {"age": retention_s, "chunk": chunk, "slot": slot, "margin": margin_s}
    total = 0
    while True:
        deleted = conn.execute(sql, params).rowcount
        total += deleted
        if deleted < chunk:
            return total
