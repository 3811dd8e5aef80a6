"""The stack's process roles in tests: each test schema's grants, and settings per role.

The owner (OUTBOX_DATABASE_URL) migrates and does what only an owner or a superuser may; the
processes under test (API, relays, projectors) connect as the application's role
(STACK_APP_DATABASE_URL) or the relay's (STACK_RELAY_DATABASE_URL), as `make up` made them.
"""

from __future__ import annotations

import os
from typing import TypeVar

import psycopg
from sqlalchemy import make_url

from outbox.db import libpq_dsn
from outbox.grants import grants_sql
from outbox.migrate import histories
from outbox.settings import Settings

APP_URL = "STACK_APP_DATABASE_URL"
RELAY_URL = "STACK_RELAY_DATABASE_URL"
S = TypeVar("S", bound=Settings)


def role_url(variable: str) -> str:
    """The database URL of a process role (APP_URL or RELAY_URL)."""
    return os.environ[variable]


def role_name(variable: str) -> str:
    """The role name in a process role's URL."""
    name = make_url(role_url(variable)).username
    assert name, f"{variable} names no role"
    return name


def apply_grants(settings: Settings) -> None:
    """Run what `outbox grants` prints for the stack's roles in these settings' schema, as
    the owner."""
    sql = grants_sql(settings.db_schema, role_name(APP_URL), role_name(RELAY_URL),
                     histories())
    with psycopg.connect(libpq_dsn(settings), autocommit=True) as conn:
        conn.execute(sql)


def as_app(settings: S) -> S:
    """The settings with the application's role as the database user."""
    return settings.model_copy(update={"database_url": role_url(APP_URL)})


def as_relay(settings: S) -> S:
    """The settings with the relay's role as the database user."""
    return settings.model_copy(update={"database_url": role_url(RELAY_URL)})
