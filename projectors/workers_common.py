"""What the fact-producing workers share: tracking records and reading an event's image."""

from __future__ import annotations

import uuid

from sqlalchemy import select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.engine import Connection, RowMapping

from outbox.envelope import EventEnvelope
from outbox.models import image_table, processed_event_table


def claim_event(conn: Connection, consumer: str, event_id: uuid.UUID) -> bool:
    """Record (consumer, event id) in the caller's transaction; False when it was already
    recorded, i.e. the event is a redelivery and must have no second effect."""
    inserted = conn.execute(
        insert(processed_event_table).values(consumer=consumer, event_id=event_id)
        .on_conflict_do_nothing().returning(processed_event_table.c.event_id)
    ).first()
    return inserted is not None


def current_image(conn: Connection, event: EventEnvelope, state: str) -> RowMapping | None:
    """The image the event is about, locked, if it is still in `state` at the event's
    version (otherwise the event is stale and there is nothing to do)."""
    row = conn.execute(
        select(image_table).where(image_table.c.id == uuid.UUID(event.aggregate_id))
        .with_for_update()
    ).mappings().one_or_none()
    if row is None or row["state"] != state or row["version"] != event.aggregate_version:
        return None
    return row
