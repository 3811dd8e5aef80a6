"""Deleting outbox rows that no relay needs any more, in bounded chunks."""

from __future__ import annotations

import psycopg

# Poll mode needs a row until it is published; logical mode reads the WAL, so the table copy
# may go once the retention has passed.
_CONDITION = {
    "poll": "published_at < now() - make_interval(secs => %(age)s)",
    "logical": "created_at < now() - make_interval(secs => %(age)s)",
}


def purge_outbox(conn: psycopg.Connection, mode: str, retention_s: float,
                 chunk: int = 10_000) -> int:
    """Delete old rows (up to `chunk` per statement, until none is left); return how many."""
    sql = (f"delete from outbox where id in (select id from outbox where {_CONDITION[mode]} "
           "limit %(chunk)s)")
    total = 0
    while True:
        deleted = conn.execute(sql, {"age": retention_s, "chunk": chunk}).rowcount
        total += deleted
        if deleted < chunk:
            return total
