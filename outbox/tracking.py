"""Tracking records: a DB-writing consumer records (consumer, event id) in the transaction of
its result, so a redelivered event has no second effect."""

from __future__ import annotations

import uuid

from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.engine import Connection

from outbox.tables import processed_event_table

# Built once: composing the statement per call costs about as much as its round trip.
_CLAIM = (insert(processed_event_table).on_conflict_do_nothing()
          .returning(processed_event_table.c.event_id))


def claim_event(conn: Connection, consumer: str, event_id: uuid.UUID) -> bool:
    """Record (consumer, event id) in the caller's transaction; False when it was already
    recorded, i.e. the event is a redelivery and must have no second effect."""
    inserted = conn.execute(_CLAIM, {"consumer": consumer, "event_id": event_id}).first()
    return inserted is not None
