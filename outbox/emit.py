"""`emit`: insert an outbox row inside the caller's transaction, and nothing else."""

from __future__ import annotations

import os
import uuid
from typing import Any

from sqlalchemy import insert
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session

from outbox.tables import outbox_table


class NoTransactionError(RuntimeError):
    """`emit` was called outside a transaction: the event could commit without its change."""


def new_traceparent() -> str:
    """A fresh W3C trace context (version 00, sampled)."""
    return f"00-{os.urandom(16).hex()}-{os.urandom(8).hex()}-01"


# Built once: `.values(...)` per call costs about as much as the insert's round trip.
_INSERT = insert(outbox_table)


def emit(
    session: Session | Connection,
    *,
    aggregate_type: str,
    aggregate_id: str | uuid.UUID,
    type: str,
    payload: dict[str, Any],
    aggregate_version: int | None = None,
    org_id: str | None = None,
    headers: dict[str, str] | None = None,
) -> uuid.UUID:
    """Record an event in the outbox within the caller's open transaction.

    The row commits or rolls back with the caller's state change; a rollback leaves no trace.
    `session` is a SQLAlchemy Session or Connection with a transaction already begun.
    Returns the event id (the consumers' dedup key). A `traceparent` header is created when
    the caller passes none.
    """
    if not session.in_transaction():
        raise NoTransactionError(
            "emit() needs an open transaction (use `with session.begin():` or "
            "`with engine.begin() as conn:`) so the event commits with the state change"
        )
    if not aggregate_type or not type:
        raise ValueError("aggregate_type and type must be non-empty")
    event_id = uuid.uuid4()
    hdrs = dict(headers or {})
    hdrs.setdefault("traceparent", new_traceparent())
    session.execute(_INSERT, {
        "id": event_id,
        "aggregate_type": aggregate_type,
        "aggregate_id": str(aggregate_id),
        "type": type,
        "aggregate_version": aggregate_version,
        "org_id": org_id,
        "payload": payload,
        "headers": hdrs,
    })
    return event_id
