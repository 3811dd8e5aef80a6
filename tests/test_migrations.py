"""Migrations are explicit DDL with a history per package; the table objects the code
queries with must match what they create."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect, text

from images.tables import metadata as image_metadata
from outbox.migrate import histories
from outbox.tables import metadata as core_metadata


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
