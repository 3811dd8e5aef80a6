"""Reading outbox rows with SQL (the polling relay, and the backfill of a new slot): the
columns a relay selects, by name, and the row as an `OutboxRecord`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from outbox.envelope import OutboxRecord, rfc3339

# Output name -> SQL expression; rows are read with psycopg's dict_row, by these names.
_COLUMNS = {
    "seq": "seq",
    "id": "id::text",
    "aggregate_type": "aggregate_type",
    "aggregate_id": "aggregate_id",
    "type": "type",
    "aggregate_version": "aggregate_version",
    "org_id": "org_id",
    "payload_json": "payload::text",
    "headers_json": "headers::text",
    "created_at": "created_at",
}
SELECT_LIST = ", ".join(f"{expr} as {name}" for name, expr in _COLUMNS.items())


def record_from_row(row: Mapping[str, Any]) -> OutboxRecord:
    """An OutboxRecord from a row selected with SELECT_LIST (the commit time approximated by
    the insert time)."""
    created = row["created_at"]
    return OutboxRecord(id=row["id"], aggregate_type=row["aggregate_type"],
                        aggregate_id=row["aggregate_id"], type=row["type"],
                        aggregate_version=row["aggregate_version"], org_id=row["org_id"],
                        payload_json=row["payload_json"], headers_json=row["headers_json"],
                        occurred_at=rfc3339(created), commit_time=created.timestamp())
