"""Image resources in the database: create, load, and the one transition function.

Every change is a guarded update (`state` and `version` must match) plus its outbox event,
in the caller's transaction. An illegal or stale transition raises and writes nothing.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, insert, select, update
from sqlalchemy.engine import Connection, RowMapping

from outbox import tracing
from outbox.emit import emit
from outbox.tracing import child_traceparent
from outbox_images.policy import (
    CREATED_EVENT,
    REQUEUE_EVENTS,
    RESYNC_EVENT,
    TRANSITIONS,
    ImageState,
    deadline_seconds,
)
from outbox_images.settings import ImageSettings
from outbox_images.tables import image_event_table, image_table, result_cache_table

AGGREGATE = "image"


class ImageError(Exception):
    """A refused operation on an image; `code` is machine-readable."""

    code = "image_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ImageNotFound(ImageError):
    """No such image in the caller's org."""

    code = "not_found"


class IllegalTransition(ImageError):
    """The transition table does not allow this move."""

    code = "illegal_transition"


class StaleVersion(ImageError):
    """The image changed since it was read."""

    code = "version_conflict"


def _jsonable(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, uuid.UUID):
        return str(value)
    return value


def image_document(row: Mapping[str, Any]) -> dict[str, Any]:
    """The resource's full current document: the payload of each of its events."""
    return {
        "id": str(row["id"]),
        "org_id": row["org_id"],
        "state": row["state"],
        "version": row["version"],
        "filename": row["filename"],
        "content_type": row["content_type"],
        "declared_size": row["declared_size"],
        "object_size": row["object_size"],
        "object_etag": row["object_etag"],
        "checksum_sha256": row["checksum_sha256"],
        "object_key": row["object_key"],
        "metadata": row["metadata"],
        "attempts": row["attempts"],
        "crashes": row["crashes"],
        "last_error": row["last_error"],
        "ocr": row["ocr"],
        "embedding": row["embedding"],
        "deadline_at": _jsonable(row["deadline_at"]),
        "state_entered_at": _jsonable(row["state_entered_at"]),
        "created_at": _jsonable(row["created_at"]),
        "updated_at": _jsonable(row["updated_at"]),
    }


def _deadline(state: ImageState, settings: ImageSettings) -> Any:
    secs = deadline_seconds(state, settings)
    return None if secs is None else func.now() + timedelta(seconds=secs)


def trace_id_of(traceparent: str | None) -> str:
    """The trace id of a W3C `traceparent` header, or a new one when it is absent or
    malformed."""
    return tracing.trace_id_of(traceparent) or os.urandom(16).hex()


_HISTORY_INSERT = insert(image_event_table)  # built once, as `emit` does


def _emit_for(conn: Connection, row: RowMapping, event_type: str) -> None:
    """The event of a change, continuing the image's trace, and its line in the history."""
    # The parent is the span being served (a request, a worker's event) when it belongs to
    # the image's trace.
    traceparent = child_traceparent(row["trace_id"] or trace_id_of(None))
    event_id = emit(
        conn,
        aggregate_type=AGGREGATE,
        aggregate_id=row["id"],
        type=event_type,
        payload=image_document(row),
        aggregate_version=row["version"],
        org_id=row["org_id"],
        headers={"traceparent": traceparent},
    )
    conn.execute(_HISTORY_INSERT, {
        "event_id": event_id, "image_id": row["id"], "org_id": row["org_id"],
        "version": row["version"], "type": event_type, "state": row["state"],
        "attempts": row["attempts"], "last_error": row["last_error"],
        "traceparent": traceparent})


def create_image(
    conn: Connection,
    settings: ImageSettings,
    *,
    image_id: uuid.UUID,
    org_id: str,
    filename: str,
    content_type: str,
    declared_size: int,
    object_key: str,
    checksum_sha256: str | None = None,
    metadata: dict[str, Any] | None = None,
    traceparent: str | None = None,
) -> RowMapping:
    """Insert a new image in `requested` (version 1) with its `image.requested` event. Every
    later event of the image continues the trace of `traceparent` (the request's)."""
    row = (
        conn.execute(
            insert(image_table)
            .values(
                id=image_id,
                org_id=org_id,
                state=ImageState.REQUESTED,
                version=1,
                filename=filename,
                content_type=content_type,
                declared_size=declared_size,
                object_key=object_key,
                checksum_sha256=checksum_sha256,
                metadata=metadata,
                trace_id=trace_id_of(traceparent),
                deadline_at=_deadline(ImageState.REQUESTED, settings),
            )
            .returning(*image_table.c)
        )
        .mappings()
        .one()
    )
    _emit_for(conn, row, CREATED_EVENT)
    return row


def load_image(
    conn: Connection, org_id: str, image_id: uuid.UUID, *, for_update: bool = False
) -> RowMapping:
    """The image of this org (another org's image does not exist for the caller)."""
    stmt = select(image_table).where(image_table.c.id == image_id, image_table.c.org_id == org_id)
    if for_update:
        stmt = stmt.with_for_update()
    row = conn.execute(stmt).mappings().one_or_none()
    if row is None:
        raise ImageNotFound(f"image {image_id} not found")
    return row


def lock_at_version(conn: Connection, image_id: str, state: str, version: int | None
                    ) -> RowMapping | None:
    """The image, locked, if it is still in `state` at `version` (what an event asked for);
    None when it moved on, i.e. the event is stale and there is nothing to do."""
    row = conn.execute(
        select(image_table).where(image_table.c.id == uuid.UUID(image_id)).with_for_update()
    ).mappings().one_or_none()
    if row is None or row["state"] != state or row["version"] != version:
        return None
    return row


def transition(
    conn: Connection,
    current: Mapping[str, Any],
    to: ImageState,
    settings: ImageSettings,
    changes: Mapping[str, Any] | None = None,
) -> RowMapping:
    """Move `current` to `to` (or update it in place when `to` is its state), bump the
    version, set the deadline of the new state, and emit the declared event.

    Raises IllegalTransition when the table does not allow it and StaleVersion when the row
    changed since `current` was read; in both cases nothing is written.
    """
    source = ImageState(current["state"])
    event_type = TRANSITIONS.get((source, to))
    if event_type is None:
        raise IllegalTransition(f"an image cannot go from {source} to {to}")
    values: dict[str, Any] = {**(changes or {})}
    if to is not source:
        values.update(state=to, state_entered_at=func.now(), deadline_at=_deadline(to, settings))
    return _guarded_update(conn, current, values, event_type)


def requeue(conn: Connection, current: Mapping[str, Any], settings: ImageSettings
            ) -> RowMapping:
    """Ask again for the work an overdue waiting state waits for (see REQUEUE_EVENTS):
    a new version and deadline, and the state's requeue event. Raises like `transition`."""
    source = ImageState(current["state"])
    event_type = REQUEUE_EVENTS.get(source)
    if event_type is None:
        raise IllegalTransition(f"an image in {source} cannot be requeued")
    return _guarded_update(conn, current, {"deadline_at": _deadline(source, settings)},
                           event_type)


def delete(conn: Connection, current: Mapping[str, Any], settings: ImageSettings
           ) -> RowMapping:
    """Move the image to `deleted`, dropping its OCR text and vector from the row and its
    OCR result from the result cache in the same transaction (the object follows from the
    event). Raises like `transition`."""
    checksum = (current["ocr"] or {}).get("checksum")
    if checksum:
        conn.execute(result_cache_table.delete().where(result_cache_table.c.kind == "ocr",
                                                       result_cache_table.c.checksum == checksum))
    return transition(conn, current, ImageState.DELETED, settings,
                      {"ocr": None, "embedding": None})


def resync(conn: Connection, current: Mapping[str, Any]) -> RowMapping:
    """Emit the current document again (`image.resynced`, a new version, same state), so
    every view converges on the database through the log. Raises like `transition`."""
    return _guarded_update(conn, current, {}, RESYNC_EVENT)


def _guarded_update(conn: Connection, current: Mapping[str, Any], values: dict[str, Any],
                    event_type: str) -> RowMapping:
    source = ImageState(current["state"])
    values = {**values, "version": current["version"] + 1, "updated_at": func.now()}
    stmt = (
        update(image_table)
        .where(
            image_table.c.id == current["id"],
            image_table.c.state == source,
            image_table.c.version == current["version"],
        )
        .values(**values)
        .returning(*image_table.c)
    )
    row = conn.execute(stmt).mappings().one_or_none()
    if row is None:
        raise StaleVersion(
            f"image {current['id']} changed since version {current['version']} was read"
        )
    _emit_for(conn, row, event_type)
    return row
