"""`emit`: insert an outbox row inside the caller's transaction, and nothing else."""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import bindparam, text
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session


class NoTransactionError(RuntimeError):
    """`emit` was called outside a transaction: the event could commit without its change."""


# `emit` calls the SQL function rather than inserting the row itself: one definition of the
# event (validation, trace header, table or message mode read from the database), the same
# for every language. Measured (bench/pipeline.py, `outbox_overhead.function_vs_insert`, 4
# clients, 4 pairs of 3 s on 2 shared cores): 1,839 transactions/s through the function
# against 1,901 with the INSERT, pair-by-pair ratio 1.02 (spread 0.71-1.38): no difference
# beyond the noise of the round trip that dominates both.
_EMIT = text(
    "select outbox_emit(:aggregate_type, :aggregate_id, :type, :payload, "
    ":aggregate_version, :org_id, :headers)"
).bindparams(bindparam("payload", type_=JSONB), bindparam("headers", type_=JSONB))


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
    the caller passes none. In message mode (OUTBOX_EMIT_MODE=message, stored by `outbox
    migrate`) the event is a logical-decoding message instead of a row, refused while the
    schema's replication slot does not exist.
    """
    if not session.in_transaction():
        raise NoTransactionError(
            "emit() needs an open transaction (use `with session.begin():` or "
            "`with engine.begin() as conn:`) so the event commits with the state change"
        )
    if not aggregate_type or not type:
        raise ValueError("aggregate_type and type must be non-empty")
    return session.execute(_EMIT, {
        "aggregate_type": aggregate_type,
        "aggregate_id": str(aggregate_id),
        "type": type,
        "aggregate_version": aggregate_version,
        "org_id": org_id,
        "payload": payload,
        "headers": headers or {},
    }).scalar_one()
