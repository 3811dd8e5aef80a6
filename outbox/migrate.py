"""Applying the migrations (`outbox migrate`).

The core owns one Alembic history (the outbox, tracking records, relay state). A package
built on it that has tables of its own registers its history under the entry-point group
`outbox.migrations`; each history keeps its own version table in the configured schema.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path

from alembic import command, context
from alembic.config import Config
from sqlalchemy import text

from outbox.db import checked_schema, make_engine
from outbox.grants import RoleGrants, on_function, on_table
from outbox.pg_names import CONFIG_TABLE, OUTBOX_TABLE
from outbox.publication import ensure_publication_sql
from outbox.settings import Settings


@dataclass(frozen=True)
class MigrationHistory:
    """One Alembic history: where its scripts are, which table records its revision, and
    what the application's and the relay's roles need on its objects (`outbox grants`)."""

    name: str
    location: Path
    version_table: str
    grants: RoleGrants = field(default_factory=RoleGrants)


# The application emits through `outbox_emit` (SECURITY DEFINER) and records what its
# workers processed; the relay reads the outbox, marks it (poll), purges it and the tracking
# records (janitor), keeps `relay_slot`, and reads the emit mode.
CORE = MigrationHistory(
    "outbox", Path(__file__).resolve().parent / "migrations", "outbox_schema_version",
    RoleGrants(
        app=(on_function("outbox_emit(text, text, text, jsonb, bigint, text, jsonb)"),
             on_table("processed_event", "SELECT, INSERT")),
        relay=(on_table(OUTBOX_TABLE, "SELECT, UPDATE (published_at), DELETE"),
               on_table("relay_slot", "SELECT, INSERT, UPDATE, DELETE"),
               on_table("processed_event", "SELECT, DELETE"),
               on_table(CONFIG_TABLE, "SELECT")),
    ))


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
    if CORE in selected and revision == "head":
        ensure_publication(settings)


def ensure_publication(settings: Settings) -> None:
    """Make the publication publish the outbox's inserts again when it was dropped or
    changed since the migration made it: `outbox migrate` run by the owner is the one fix a
    relay without ownership asks for."""
    schema = checked_schema(settings.db_schema)
    engine = make_engine(settings)
    try:
        with engine.begin() as conn:
            conn.execute(text(ensure_publication_sql(schema)))
    finally:
        engine.dispose()


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
