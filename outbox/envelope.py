"""The event envelope: the one definition of the wire format, encoded by the relays and
decoded by the consumers.

Kafka key = aggregate id (per-aggregate order); headers carry `id`, `type` and the row's own
headers (`traceparent`); the value is the JSON envelope. Payloads carry the resource's full
current document (event-carried state), so a view can be written from the latest event
alone. Decoding ignores fields it does not know (a newer relay may add some) and refuses a
schema version it does not speak.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, PrivateAttr, field_validator

SCHEMA_VERSION = 1
SCHEMA_PATH = Path(__file__).resolve().parent / "schemas" / "event-envelope.schema.json"


def encode_value(*, id: str, type: str, aggregate_type: str, aggregate_id: str,
                 aggregate_version: int | None, org_id: str | None, occurred_at: str,
                 payload_json: bytes) -> bytes:
    """The Kafka record value. `payload_json` is spliced in as it is, so a relay forwards the
    database's JSON text without parsing and re-encoding it."""
    head = orjson.dumps({
        "id": id,
        "type": type,
        "aggregate_type": aggregate_type,
        "aggregate_id": aggregate_id,
        "aggregate_version": aggregate_version,
        "org_id": org_id,
        "occurred_at": occurred_at,
        "schema": SCHEMA_VERSION,
    })
    return b"".join((head[:-1], b',"payload":', payload_json, b"}"))


def rfc3339(ts: datetime | str) -> str:
    """A timestamp as RFC 3339. Accepts a datetime or PostgreSQL's ISO text output in UTC
    (`2026-11-22 12:00:00.5+00`)."""
    if isinstance(ts, datetime):
        return ts.isoformat()
    text = ts.replace(" ", "T", 1)
    if len(text) >= 3 and text[-3] in "+-" and text[-2:].isdigit():
        text += ":00"
    return text


def kafka_headers(event_id: str, event_type: str, headers_json: str | bytes | None
                  ) -> list[tuple[str, bytes]]:
    """`id`, `type`, then the row's own headers (`traceparent` among them)."""
    extra = orjson.loads(headers_json) if headers_json else {}
    if not isinstance(extra, dict):  # a row written by hand may hold JSON null
        extra = {}
    out = [("id", event_id.encode()), ("type", event_type.encode())]
    out += [(k, str(v).encode()) for k, v in extra.items() if k not in {"id", "type"}]
    return out


@dataclass(frozen=True, slots=True)
class OutboxRecord:
    """One outbox row on its way to Kafka, with `payload` and `headers` kept as the
    database's JSON text so a relay never parses a payload it only forwards."""

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

    def value(self) -> bytes:
        """The JSON envelope (the `envelope` wire format; `outbox/wire_formats.py` has all)."""
        return encode_value(id=self.id, type=self.type, aggregate_type=self.aggregate_type,
                            aggregate_id=self.aggregate_id,
                            aggregate_version=self.aggregate_version, org_id=self.org_id,
                            occurred_at=self.occurred_at, payload_json=self.payload_json.encode())

    def kafka_headers(self) -> list[tuple[str, bytes]]:
        """The record's Kafka headers."""
        return kafka_headers(self.id, self.type, self.headers_json)

    def without_payload(self) -> OutboxRecord:
        """The same event with an empty payload: what a dead letter can still carry."""
        return replace(self, payload_json="{}")


class EventEnvelope(BaseModel):
    """One event as it travels on Kafka."""

    model_config = ConfigDict(populate_by_name=True, extra="ignore", frozen=True)

    id: uuid.UUID = Field(description="event id, the consumers' dedup key")
    type: str = Field(min_length=1, description="e.g. order.paid")
    aggregate_type: str = Field(min_length=1)
    aggregate_id: str = Field(min_length=1)
    aggregate_version: int | None = Field(default=None, ge=0)
    org_id: str | None = None
    occurred_at: AwareDatetime
    schema_version: int = Field(default=SCHEMA_VERSION, alias="schema",
                                description="incremented only for incompatible changes")
    payload: dict[str, Any]
    # Set by the consumer that read it: its trace context (from the Kafka headers, so not
    # part of the value or the schema).
    _trace: Any = PrivateAttr(default=None)

    @property
    def trace(self) -> Any:
        """What the consumer attached for tracing (`projectors/apply_spans.py`), or None."""
        return self._trace

    def attach_trace(self, trace: Any) -> None:
        """Attach the consumer's trace context of this event."""
        self._trace = trace

    @field_validator("schema_version")
    @classmethod
    def _spoken(cls, v: int) -> int:
        if v != SCHEMA_VERSION:
            raise ValueError(f"envelope schema {v} is not supported (this reader speaks "
                             f"{SCHEMA_VERSION})")
        return v

    def to_json(self) -> bytes:
        """The Kafka record value, encoded exactly as the relays encode it."""
        return encode_value(id=str(self.id), type=self.type, aggregate_type=self.aggregate_type,
                            aggregate_id=self.aggregate_id,
                            aggregate_version=self.aggregate_version, org_id=self.org_id,
                            occurred_at=rfc3339(self.occurred_at),
                            payload_json=orjson.dumps(self.payload))

    @classmethod
    def from_json(cls, raw: bytes | str) -> EventEnvelope:
        """Parse and validate a Kafka record value (raises pydantic.ValidationError)."""
        return cls.model_validate_json(raw)


def envelope_json_schema() -> dict[str, Any]:
    """The JSON schema of the envelope, as published in `outbox/schemas/`."""
    schema = EventEnvelope.model_json_schema(by_alias=True)
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = "https://outbox-sidecar/schemas/event-envelope.schema.json"
    return schema


def write_json_schema(path: Path = SCHEMA_PATH) -> None:
    """Regenerate the published schema file."""
    path.write_text(json.dumps(envelope_json_schema(), indent=2, sort_keys=True) + "\n")
