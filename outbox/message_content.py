"""The content of an event written as a logical-decoding message (`OUTBOX_EMIT_MODE=message`).

`outbox_emit` (the SQL function, migration 0002) writes, and the logical relay reads:

    <head: one JSON object, no newline> "\\n" <payload: the jsonb payload's text>

The head holds `v` (this format's version), `id`, `aggregate_type`, `aggregate_id`, `type`,
`aggregate_version`, `org_id`, `headers` and `occurred_at` (PostgreSQL's
`YYYY-MM-DD HH24:MI:SS.US+00`, as a `timestamptz` column reads in UTC). PostgreSQL's JSON
text output never holds a raw newline (a newline inside a string is escaped), so the first
newline ends the head, and the payload is spliced into the Kafka record without being
parsed, as the table path does with the jsonb column.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

CONTENT_VERSION = 1
_SEPARATOR = b"\n"


class BadMessageContent(ValueError):
    """A message with the outbox's prefix whose content is not this format."""


@dataclass(frozen=True, slots=True)
class MessageContent:
    """A decoded message: the head's fields, and the payload as JSON text."""

    id: str
    aggregate_type: str
    aggregate_id: str
    type: str
    aggregate_version: int | None
    org_id: str | None
    headers: dict[str, Any]
    occurred_at: str
    payload_json: bytes


def decode_content(content: bytes) -> MessageContent:
    """The fields of a message's content; BadMessageContent when it is not this format."""
    cut = content.find(_SEPARATOR)
    if cut < 0:
        raise BadMessageContent("no newline between the head and the payload")
    try:
        head = orjson.loads(content[:cut])
        if head.get("v") != CONTENT_VERSION:
            raise BadMessageContent(f"content version {head.get('v')!r}, expected "
                                    f"{CONTENT_VERSION}")
        version = head["aggregate_version"]
        headers = head["headers"]
        if not isinstance(headers, dict):
            raise BadMessageContent("headers is not a JSON object")
        return MessageContent(
            id=head["id"], aggregate_type=head["aggregate_type"],
            aggregate_id=head["aggregate_id"], type=head["type"],
            aggregate_version=None if version is None else int(version),
            org_id=head["org_id"], headers=headers, occurred_at=head["occurred_at"],
            payload_json=content[cut + 1:])
    except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
        raise BadMessageContent(f"unreadable head: {exc}") from exc
