"""Test helper: the envelope of an aggregate's latest outbox row, as a relay would send it."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.engine import Engine

from outbox.envelope import EventEnvelope
from outbox.models import outbox_table


def latest_event(engine: Engine, aggregate_id: str) -> EventEnvelope:
    """The newest event of `aggregate_id` in the outbox table."""
    with engine.connect() as conn:
        row = conn.execute(select(outbox_table).where(outbox_table.c.aggregate_id == aggregate_id)
                           .order_by(outbox_table.c.seq.desc()).limit(1)).mappings().one()
    return EventEnvelope(id=row["id"], type=row["type"], aggregate_type=row["aggregate_type"],
                         aggregate_id=row["aggregate_id"],
                         aggregate_version=row["aggregate_version"], org_id=row["org_id"],
                         occurred_at=row["created_at"], payload=row["payload"])
