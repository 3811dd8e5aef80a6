"""An outbox row on its way to Kafka: topic, key, envelope value and headers."""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime

import orjson


def rfc3339(ts: datetime | str) -> str:
    """A timestamp as RFC 3339. Accepts a datetime or PostgreSQL's ISO text output in UTC
    (`2026-11-22 12:00:00.5+00`)."""
    if isinstance(ts, datetime):
        return ts.isoformat()
    text = ts.replace(" ", "T", 1)
    if len(text) >= 3 and text[-3] in "+-" and text[-2:].isdigit():
        text += ":00"
    return text


@dataclass(frozen=True, slots=True)
class OutboxRecord:
    """One outbox row, with `payload` and `headers` kept as the database's JSON text so the
    relay never parses a payload it only forwards."""

    id: str
    aggregate_type: str
    aggregate_id: str
    type: str
    aggregate_version: int | None
    org_id: str | None
    payload_json: str
    headers_json: str
    occurred_at: str
    commit_time: float | None = None  # epoch seconds of the commit, when known

    def topic(self, prefix: str) -> str:
        """`<prefix>.<aggregate_type>`."""
        return f"{prefix}.{self.aggregate_type}"

    def value(self) -> bytes:
        """The JSON envelope (see `outbox.envelope.EventEnvelope`)."""
        head = orjson.dumps(
            {
                "id": self.id,
                "type": self.type,
                "aggregate_type": self.aggregate_type,
                "aggregate_id": self.aggregate_id,
                "aggregate_version": self.aggregate_version,
                "org_id": self.org_id,
                "occurred_at": self.occurred_at,
                "schema": 1,
            }
        )
        # The payload is spliced in as the database's JSON text, never parsed and re-encoded.
        return b"".join((head[:-1], b',"payload":', self.payload_json.encode(), b"}"))

    def without_payload(self) -> OutboxRecord:
        """The same event with an empty payload: what a dead letter can still carry."""
        return replace(self, payload_json="{}")

    def kafka_headers(self) -> list[tuple[str, bytes]]:
        """`id`, `type`, then the row's own headers (`traceparent` among them)."""
        extra = orjson.loads(self.headers_json) if self.headers_json else {}
        if not isinstance(extra, dict):  # a row written by hand may hold JSON null
            extra = {}
        out = [("id", self.id.encode()), ("type", self.type.encode())]
        out += [(k, str(v).encode()) for k, v in extra.items() if k not in {"id", "type"}]
        return out


# The outbox columns a relay reads with SQL, in the order `record_from_row` expects.
RECORD_COLUMNS = (
    "id::text, aggregate_type, aggregate_id, type, aggregate_version, org_id, "
    "payload::text, headers::text, created_at"
)


def record_from_row(row: tuple) -> OutboxRecord:
    """An OutboxRecord from a row selected as RECORD_COLUMNS (commit time approximated by
    the insert time)."""
    created: datetime = row[8]
    return OutboxRecord(id=row[0], aggregate_type=row[1], aggregate_id=row[2], type=row[3],
                        aggregate_version=row[4], org_id=row[5], payload_json=row[6],
                        headers_json=row[7], occurred_at=rfc3339(created),
                        commit_time=created.timestamp())
