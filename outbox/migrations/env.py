"""Alembic environment: migrations run inside the configured schema."""

from __future__ import annotations

from alembic import context
from sqlalchemy import text

from outbox.db import checked_schema, make_engine
from outbox.models import metadata
from outbox.settings import Settings

settings: Settings = context.config.attributes.get("settings") or Settings()
schema = checked_schema(settings.db_schema)

engine = make_engine(settings)
with engine.connect() as connection:
    connection.execute(text(f'CREATE SCHEMA IF NOT EXISTS "{schema}"'))
    connection.commit()
    context.configure(
        connection=connection,
        target_metadata=metadata,
        version_table_schema=schema,
        transaction_per_migration=True,
    )
    with context.begin_transaction():
        context.run_migrations()
engine.dispose()
