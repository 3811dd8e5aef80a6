"""Migrations are explicit DDL with a history per package; the table objects the code
queries with must match what they create."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect, make_url, text

from outbox.migrate import histories, migrate
from outbox.pg_names import publication_name
from outbox.tables import metadata as core_metadata
from outbox_images.tables import metadata as image_metadata


def test_code_tables_match_the_migrated_schema(engine):
    for metadata in (core_metadata, image_metadata):
        def own(name, type_, parent, tables=metadata.tables):  # the other history's are not
            table = name if type_ == "table" else parent.get("table_name")
            return table is None or table in tables

        with engine.connect() as conn:
            ctx = MigrationContext.configure(conn, opts={"include_name": own})
            assert compare_metadata(ctx, metadata) == []


def test_each_history_records_its_own_revision(engine, migrated):
    names = [h.name for h in histories()]
    assert names == ["outbox", "images"]
    tables = set(inspect(engine).get_table_names())
    with engine.connect() as conn:
        for h in histories():
            assert h.version_table in tables
            assert conn.execute(text(f"select count(*) from {h.version_table}")).scalar() == 1
    assert {"outbox", "processed_event", "relay_slot", "image", "result_cache"} <= tables


def test_the_migration_makes_the_publication_and_every_migrate_repairs_it(migrated, engine):
    pub, schema = publication_name(migrated.db_schema), migrated.db_schema
    covered = text("select count(*) from pg_publication_tables where pubname = :p"
                   " and schemaname = :s and tablename = 'outbox'")
    owner = text("select pubowner::regrole::text from pg_publication where pubname = :p")
    with engine.connect() as conn:
        assert conn.execute(covered, {"p": pub, "s": schema}).scalar() == 1
        assert conn.execute(owner, {"p": pub}).scalar() == make_url(migrated.database_url).username
    for breakage in (f'ALTER PUBLICATION "{pub}" DROP TABLE "{schema}".outbox',
                     f"ALTER PUBLICATION \"{pub}\" SET (publish = 'update')",
                     f'DROP PUBLICATION "{pub}"'):
        with engine.begin() as conn:
            conn.execute(text(breakage))
        migrate(migrated)  # at head already: only the repair runs
        with engine.connect() as conn:
            assert conn.execute(covered, {"p": pub, "s": schema}).scalar() == 1, breakage
            assert conn.execute(text("select pubinsert from pg_publication where pubname = :p"),
                                {"p": pub}).scalar() is True
