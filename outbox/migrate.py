"""Applying the migrations (`outbox migrate`).

The core owns one Alembic history (the outbox, tracking records, relay state). A package
built on it that has tables of its own registers its history under the entry-point group
`outbox.migrations`; each history keeps its own version table in the configured schema.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path

from alembic import command, context
from alembic.config import Config
from sqlalchemy import text

from outbox.db import checked_schema, make_engine
from outbox.pg_names import CONFIG_TABLE
from outbox.settings import Settings


@dataclass(frozen=True)
class MigrationHistory:
    """One Alembic history: where its scripts are and which table records its revision."""

    name: str
    location: Path
    version_table: str


CORE = MigrationHistory("outbox", Path(__file__).resolve().parent / "migrations",
                        "outbox_schema_version")


def histories() -> list[MigrationHistory]:
    """The core history first, then every registered one, by name."""
    found = sorted(entry_points(group="outbox.migrations"), key=lambda ep: ep.name)
    return [CORE, *(ep.load() for ep in found)]


def _config(settings: Settings, history: MigrationHistory) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(history.location))
    cfg.attributes["settings"] = settings
    cfg.attributes["version_table"] = history.version_table
    return cfg


def migrate(settings: Settings, revision: str = "head", only: str | None = None) -> None:
    """Bring every history (or the one named `only`) in the configured schema to
    `revision`."""
    selected = [h for h in histories() if only is None or h.name == only]
    if not selected:
        raise ValueError(f"no migration history named {only!r}")
    for history in selected:
        command.upgrade(_config(settings, history), revision)
    # Only a mode given explicitly is stored: an upgrade run without OUTBOX_EMIT_MODE must
    # not switch a message-mode deployment back to table mode.
    if CORE in selected and "emit_mode" in settings.model_fields_set:
        store_emit_mode(settings)


def store_emit_mode(settings: Settings) -> None:
    """Write OUTBOX_EMIT_MODE into the database, where `outbox_emit` reads it (a core below
    revision 0002 has no mode to store)."""
    schema = checked_schema(settings.db_schema)
    engine = make_engine(settings)
    try:
        with engine.begin() as conn:
            if conn.execute(text("select to_regclass(:t)"),
                            {"t": f'"{schema}".{CONFIG_TABLE}'}).scalar() is not None:
                conn.execute(text(f'update "{schema}".{CONFIG_TABLE} set emit_mode = :m'),
                             {"m": settings.emit_mode})
    finally:
        engine.dispose()


def run_migrations() -> None:
    """The body of every history's `env.py`: run inside the configured schema, creating it
    when absent, one transaction per migration."""
    cfg = context.config
    settings: Settings = cfg.attributes.get("settings") or Settings()
    schema = checked_schema(settings.db_schema)
    engine = make_engine(settings)
    with engine.connect() as connection:
        connection.execute(text(f'CREATE SCHEMA IF NOT EXISTS "{schema}"'))
        connection.commit()
        context.configure(
            connection=connection,
            version_table=cfg.attributes["version_table"],
            version_table_schema=schema,
            transaction_per_migration=True,
        )
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()
