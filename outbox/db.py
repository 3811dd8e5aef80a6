"""Database engines bound to the configured schema."""

from __future__ import annotations

import re

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


def make_engine(settings: Settings, **kwargs: object) -> Engine:
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
