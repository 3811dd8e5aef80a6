"""Alembic environment of the image domain's history."""

from outbox.migrate import run_migrations

run_migrations()
