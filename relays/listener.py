"""The first part of the logical relay: it reads the slot's replication stream, decodes the
pgoutput frames, and hands the processor what it needs, in commit order: each transaction's
boundaries and the outbox rows in it (table inserts, and events emitted as messages).

Rows of other tables and messages of other prefixes are dropped here; an outbox table whose
columns the relay cannot read, or a message it cannot decode, stops it (`SchemaMismatch`).
"""

from __future__ import annotations

from collections.abc import Callable
from operator import itemgetter
from typing import Protocol

import structlog

from outbox.message_content import BadMessageContent
from outbox.pg_names import message_prefix
from relays.logical_messages import NotTransactional, message_row
from relays.pgoutput import (
    BEGIN,
    COMMIT,
    INSERT,
    MESSAGE,
    RELATION,
    decode_begin,
    decode_commit,
    decode_insert,
    decode_relation,
    insert_relation_id,
)
from relays.replication import ReplicationConnection, int_to_lsn

log = structlog.get_logger(__name__)

# The outbox columns the relay reads from a row, by name.
REQUIRED_COLUMNS = ("seq", "id", "aggregate_type", "aggregate_id", "type", "aggregate_version",
                    "org_id", "payload", "headers", "created_at")
# How long a transaction that has begun may take to arrive whole before the wait is renewed.
_IN_TRANSACTION_WAIT_S = 5.0
# After a commit, how long the batch waits for the next transaction: the server decodes as
# it sends, so a backlog arrives with small gaps, and a batch cut at each gap would pay the
# batch's fixed cost (the acknowledgements; exactly-once, a Kafka commit) per transaction.
_LINGER_S = 0.005

Row = tuple[bytes | None, ...]


class SchemaMismatch(RuntimeError):
    """The outbox table no longer has the columns the relay reads: a schema change it
    cannot decode. The relay stops publishing (loudly) instead of guessing."""


class Sink(Protocol):
    """What the listener feeds (the processor)."""

    events: int  # outbox rows taken in the batch so far

    def begin(self, final_lsn: int, commit_time: float) -> None: ...
    def row(self, row: Row) -> None: ...
    def commit(self, end_lsn: int) -> None: ...


class _Relation:
    """The positions of the required columns in one relation's tuples."""

    __slots__ = ("is_outbox", "pick")

    def __init__(self, namespace: str, name: str, columns: tuple[str, ...],
                 schema: str) -> None:
        self.is_outbox = namespace == schema and name == "outbox"
        self.pick: Callable[[list], Row] = tuple
        if self.is_outbox:
            missing = [c for c in REQUIRED_COLUMNS if c not in columns]
            if missing:
                raise SchemaMismatch(
                    f"the outbox table has no column {', '.join(missing)} (columns now: "
                    f"{', '.join(columns)}); the relay cannot decode its rows")
            # The required columns of a row, in REQUIRED_COLUMNS order, in one C call.
            self.pick = itemgetter(*(columns.index(c) for c in REQUIRED_COLUMNS))


class Listener:
    """Reads one slot's stream and feeds whole transactions' outbox rows to a `Sink`."""

    def __init__(self, schema: str) -> None:
        self._schema = schema
        self._prefix = message_prefix(schema).encode()
        self._relations: dict[int, _Relation] = {}
        self.stream: ReplicationConnection | None = None

    def start(self, stream: ReplicationConnection, slot: str, publication: str,
              from_lsn: int) -> None:
        """Stream `slot` from `from_lsn` on `stream` (closed on failure)."""
        try:
            stream.start(slot, publication, from_lsn)
        except BaseException:
            stream.close()
            raise
        self.stream = stream
        self._relations.clear()  # the server sends every Relation again on a new stream

    def read(self, sink: Sink, limit: int, wait_s: float) -> None:
        """Feed `sink` whole transactions until it holds `limit` events (checked at each
        commit) or the stream has nothing more right now; wait up to `wait_s` for the first
        one, and as long as it takes for a transaction that has begun."""
        stream = self.stream
        assert stream is not None, "start() first"
        relations = self._relations
        in_txn = False
        wait = wait_s
        while True:
            frame = stream.read(_IN_TRANSACTION_WAIT_S if in_txn else wait)
            if frame is None:
                if in_txn:
                    continue  # a transaction is still arriving
                return
            tag = frame[0]
            if tag == INSERT:
                rel = relations[insert_relation_id(frame)]
                if rel.is_outbox:
                    sink.row(rel.pick(decode_insert(frame)))
            elif tag == BEGIN:
                in_txn = True
                begin = decode_begin(frame)
                sink.begin(begin.final_lsn, begin.commit_time)
            elif tag == COMMIT:
                in_txn = False
                sink.commit(decode_commit(frame).end_lsn)
                if sink.events >= limit:
                    return
                wait = _LINGER_S
            elif tag == RELATION:
                relation = decode_relation(frame)
                relations[relation.rel_id] = _Relation(
                    relation.namespace, relation.name, relation.columns, self._schema)
            elif tag == MESSAGE:
                row = self._message_row(frame)
                if row is not None:
                    sink.row(row)

    def _message_row(self, msg: bytes) -> Row | None:
        """The outbox row of a pgoutput Message of this schema's prefix; None to skip it."""
        try:
            return message_row(msg, self._prefix)
        except NotTransactional as exc:
            # Not written by `outbox_emit` (which writes transactional messages only): it has
            # no commit to order it by, so publishing it could break per-aggregate order.
            log.error("message_not_transactional", lsn=int_to_lsn(exc.lsn),
                      prefix=self._prefix.decode(), action="skipped")
            return None
        except BadMessageContent as exc:
            raise SchemaMismatch(f"a message the relay cannot decode: {exc}") from exc

    def close(self) -> None:
        """Close the stream (the server ends it; the slot stays where it was confirmed)."""
        if self.stream is not None:
            self.stream.close()
            self.stream = None
