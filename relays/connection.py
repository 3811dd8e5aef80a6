"""A database connection opened on first use and reopened after it was lost."""

from __future__ import annotations

import psycopg


class LazyConnection:
    """An autocommit psycopg connection for one relay."""

    def __init__(self, dsn: str) -> None:
        self._dsn = dsn
        self._conn: psycopg.Connection | None = None

    def get(self) -> psycopg.Connection:
        """The open connection (connecting when there is none)."""
        if self._conn is None or self._conn.closed:
            self._conn = psycopg.connect(self._dsn, autocommit=True)
        return self._conn

    def close(self) -> None:
        """Close it, if open."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None
