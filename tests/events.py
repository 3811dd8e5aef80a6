"""Test helper: an aggregate's outbox rows as envelopes, as a relay would send them."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.engine import Engine

from outbox.envelope import EventEnvelope
from outbox.tables import outbox_table


def events_of(engine: Engine, aggregate_id: str) -> list[EventEnvelope]:
    """Every event of `aggregate_id` in the outbox table, oldest first."""
    with engine.connect() as conn:
        rows = conn.execute(select(outbox_table).where(outbox_table.c.aggregate_id == aggregate_id)
                            .order_by(outbox_table.c.seq)).mappings().all()
    return [EventEnvelope(id=row["id"], type=row["type"], aggregate_type=row["aggregate_type"],
                          aggregate_id=row["aggregate_id"],
                          aggregate_version=row["aggregate_version"], org_id=row["org_id"],
                          occurred_at=row["created_at"], payload=row["payload"])
            for row in rows]


def latest_event(engine: Engine, aggregate_id: str) -> EventEnvelope:
    """The newest event of `aggregate_id`."""
    return events_of(engine, aggregate_id)[-1]
