"""Database access bound to the configured schema: SQLAlchemy engines for applications, and
plain psycopg connections (reopened after a loss) for the relays' long-lived sessions."""

from __future__ import annotations

import re
from typing import Any

import psycopg
from psycopg.conninfo import make_conninfo
from sqlalchemy import create_engine, make_url
from sqlalchemy.engine import Engine

from outbox.settings import Settings

_IDENT = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


def checked_schema(name: str) -> str:
    """The schema name, refused unless it is a plain lower-case identifier (it is spliced
    into DDL and into the connection's search_path)."""
    if not _IDENT.match(name):
        raise ValueError(f"invalid schema name {name!r}: use lower-case letters, digits, _")
    return name


def make_engine(settings: Settings, **kwargs: Any) -> Engine:
    """An engine whose connections resolve unqualified table names in the configured schema."""
    schema = checked_schema(settings.db_schema)
    return create_engine(
        settings.database_url,
        connect_args={"options": f"-c search_path={schema}"},
        pool_pre_ping=True,
        **kwargs,
    )


def libpq_dsn(settings: Settings) -> str:
    """The database URL as a libpq connection string for plain psycopg connections, with the
    configured schema as search_path and UTC as the session time zone."""
    schema = checked_schema(settings.db_schema)
    url = make_url(settings.database_url).set(drivername="postgresql")
    return make_conninfo(
        url.render_as_string(hide_password=False),
        options=f"-c search_path={schema} -c TimeZone=UTC",
    )


class ReconnectingConnection:
    """An autocommit psycopg connection, opened on first use and reopened after a loss."""

    def __init__(self, dsn: str, **connect_kwargs: Any) -> None:
        self._dsn = dsn
        self._kwargs = connect_kwargs
        self._conn: psycopg.Connection | None = None

    @property
    def is_open(self) -> bool:
        """True while a connection is open (it may still turn out to be broken)."""
        return self._conn is not None and not self._conn.closed

    def get(self) -> psycopg.Connection:
        """The open connection (connecting when there is none)."""
        if self._conn is None or self._conn.closed:
            self._conn = psycopg.connect(self._dsn, autocommit=True, **self._kwargs)
        return self._conn

    def close(self) -> None:
        """Close it, if open."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None
