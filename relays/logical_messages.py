"""Events written as logical-decoding messages (`OUTBOX_EMIT_MODE=message`), read from the
pgoutput stream (START_REPLICATION option `messages 'true'`).

A pgoutput Message ('M'): Int8 flags (1 = transactional), Int64 LSN, String prefix, Int32
length, Byte[length] content (no xid: the relay does not ask for streamed transactions).
A transactional message arrives between its transaction's Begin and Commit, in commit order
with the table rows. The content is `outbox.message_content`'s format.
"""

from __future__ import annotations

import orjson

from outbox.message_content import decode_content
from relays.pgoutput import decode_message


class NotTransactional(ValueError):
    """A message with the outbox's prefix written outside any transaction: it was decoded
    when written, not at a commit, so it has no place in the commit order (and would arrive
    again after a restart from an earlier position). `outbox_emit` never writes one."""

    def __init__(self, lsn: int) -> None:
        super().__init__(f"non-transactional message at LSN {lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}")
        self.lsn = lsn


def message_row(msg: bytes, prefix: bytes) -> tuple[bytes | None, ...] | None:
    """The outbox row (REQUIRED_COLUMNS order, bytes values, seq None) a pgoutput Message
    carries; None for a message of another prefix. NotTransactional for one of ours that is
    not transactional; BadMessageContent for content not in the outbox's format."""
    message = decode_message(msg)
    if message.prefix != prefix:
        return None
    if not message.transactional:
        raise NotTransactional(message.lsn)
    event = decode_content(message.content)
    version = event.aggregate_version
    return (None, event.id.encode(), event.aggregate_type.encode(),
            event.aggregate_id.encode(), event.type.encode(),
            None if version is None else str(version).encode(),
            None if event.org_id is None else event.org_id.encode(), event.payload_json,
            orjson.dumps(event.headers), event.occurred_at.encode())
