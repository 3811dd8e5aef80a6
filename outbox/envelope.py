"""The event envelope: one typed definition, its JSON schema, and the Kafka record form.

Kafka key = aggregate id (per-aggregate order); headers carry `id`, `type`, `traceparent`;
the value is the JSON envelope. Payloads carry the resource's full current document
(event-carried state), so a view can be written from the latest event alone.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

SCHEMA_VERSION = 1
SCHEMA_PATH = Path(__file__).resolve().parent / "schemas" / "event-envelope.schema.json"


class EventEnvelope(BaseModel):
    """One event as it travels on Kafka."""

    model_config = ConfigDict(populate_by_name=True, extra="forbid", frozen=True)

    id: uuid.UUID = Field(description="event id, the consumers' dedup key")
    type: str = Field(min_length=1, description="e.g. image.ocr_completed")
    aggregate_type: str = Field(min_length=1)
    aggregate_id: str = Field(min_length=1)
    aggregate_version: int | None = Field(default=None, ge=0)
    org_id: str | None = None
    occurred_at: AwareDatetime
    schema_version: int = Field(default=SCHEMA_VERSION, alias="schema")
    payload: dict[str, Any]

    def to_json(self) -> bytes:
        """The Kafka record value."""
        return self.model_dump_json(by_alias=True).encode()

    @classmethod
    def from_json(cls, raw: bytes | str) -> EventEnvelope:
        """Parse and validate a Kafka record value (raises pydantic.ValidationError)."""
        return cls.model_validate_json(raw)


def dlq_topic(topic: str, consumer: str) -> str:
    """The dead-letter topic of `consumer` (a projector, or `relay`) for `topic`."""
    return f"{topic}.dlq.{consumer}"


def envelope_json_schema() -> dict[str, Any]:
    """The JSON schema of the envelope, as published in `outbox/schemas/`."""
    schema = EventEnvelope.model_json_schema(by_alias=True)
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = "https://outbox-sidecar/schemas/event-envelope.schema.json"
    return schema


def write_json_schema(path: Path = SCHEMA_PATH) -> None:
    """Regenerate the published schema file."""
    path.write_text(json.dumps(envelope_json_schema(), indent=2, sort_keys=True) + "\n")
