"""One rebuild of a view at a time: a PostgreSQL advisory lock per view.

`Rebuild.run` takes it, so `outbox rebuild` and the reconciler's automatic rebuild of a lost
view (in any number of reconciler processes) never fill the same view at once. The lock is
held by a session of its own for the whole rebuild; a process that dies (SIGKILL) ends its
session and so releases it, and the next rebuild resumes the unfinished copy it left.
"""

from __future__ import annotations

import psycopg

from outbox.db import libpq_dsn
from outbox.settings import Settings


class RebuildBusy(RuntimeError):
    """Another process is rebuilding this view now."""


def rebuild_lock_name(settings: Settings, view: str) -> str:
    """The advisory lock of `view`'s rebuilds in this outbox's schema."""
    return f"outbox-rebuild:{settings.db_schema}:{view}"


class RebuildLock:
    """Held (a context manager) while a rebuild of `view` runs; entering raises RebuildBusy
    when another session holds it. Never waits: a second rebuild has nothing to add."""

    def __init__(self, settings: Settings, view: str) -> None:
        self.name = rebuild_lock_name(settings, view)
        self._dsn = libpq_dsn(settings)
        self._conn: psycopg.Connection | None = None

    def __enter__(self) -> RebuildLock:
        conn = psycopg.connect(self._dsn, autocommit=True, connect_timeout=10,
                               application_name=f"outbox rebuild {self.name}")
        got = conn.execute("select pg_try_advisory_lock(hashtextextended(%s, 0))",
                           (self.name,)).fetchone()
        if not (got and got[0]):
            holder = conn.execute(
                "select pid from pg_locks where locktype = 'advisory' and granted"
                " and ((classid::bigint << 32) | objid::bigint) = hashtextextended(%s, 0)",
                (self.name,)).fetchone()
            conn.close()
            raise RebuildBusy(f"another rebuild holds {self.name}"
                              + (f" (server process {holder[0]})" if holder else ""))
        self._conn = conn
        return self

    def __exit__(self, *_: object) -> None:
        if self._conn is not None:
            self._conn.close()  # ending the session releases the lock
            self._conn = None
