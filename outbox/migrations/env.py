"""Alembic environment of the core history."""

from outbox.migrate import run_migrations

run_migrations()
