"""The logical-decoding relay: a pgoutput slot read through the streaming replication
protocol, published in commit order.

Each batch reads committed transactions from the stream (up to `relay_batch_size` events,
or until the stream has nothing more right now), produces every outbox insert to Kafka as
it is decoded, waits until Kafka acknowledged all of them, and only then treats the
batch's last commit as acknowledged. That position is recorded in `relay_slot` and sent to
the server as the flush position at most every `relay_status_interval_s`, so the slot never
moves past an event Kafka does not have. An idle stream is moved along too (heartbeat): the
server's reply to a status request says how far it has decoded, and with no transaction
open, nothing before that position is left to publish.

The pgoutput messages the relay needs (Begin, Relation, Insert, Commit; PostgreSQL docs,
"Logical Replication Message Formats") are decoded here, on the hot path, straight from
the frame: column values are byte slices, and the jsonb payload is spliced into the
envelope without being parsed.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Callable
from operator import itemgetter

import structlog

from outbox.emit_mode import stored_emit_mode
from outbox.envelope import OutboxRecord, encode_value, kafka_headers, rfc3339
from outbox.message_content import BadMessageContent
from outbox.pg_names import message_prefix
from outbox.settings import Settings
from outbox.wire_formats import Encode
from relays.logical_messages import NotTransactional, message_row
from relays.publisher import BatchPublisher
from relays.replication import PG_EPOCH_OFFSET_US, ReplicationConnection, int_to_lsn
from relays.slot import SlotKeeper

log = structlog.get_logger(__name__)

# The outbox columns the relay reads from a row, by name.
REQUIRED_COLUMNS = ("seq", "id", "aggregate_type", "aggregate_id", "type", "aggregate_version",
                    "org_id", "payload", "headers", "created_at")

_BEGIN = struct.Struct(">Qqi")  # final LSN, commit time, xid
_COMMIT = struct.Struct(">BQQq")  # flags, commit LSN, end LSN, commit time
_U32 = struct.Struct(">I")
_U16 = struct.Struct(">H")


class SchemaMismatch(RuntimeError):
    """The outbox table no longer has the columns the relay reads: a schema change it
    cannot decode. The relay stops publishing (loudly) instead of guessing."""


class PublicationChanged(RuntimeError):
    """The publication stopped covering the outbox, or was made again: inserts may have
    been skipped by the stream, so the slot must be recreated with a backfill."""


class _Relation:
    """The positions of the required columns in one relation's tuples."""

    __slots__ = ("is_outbox", "pick")

    def __init__(self, namespace: str, name: str, columns: list[str], schema: str) -> None:
        self.is_outbox = namespace == schema and name == "outbox"
        self.pick: Callable[[list[bytes | None]], tuple[bytes | None, ...]] = tuple
        if self.is_outbox:
            missing = [c for c in REQUIRED_COLUMNS if c not in columns]
            if missing:
                raise SchemaMismatch(
                    f"the outbox table has no column {', '.join(missing)} (columns now: "
                    f"{', '.join(columns)}); the relay cannot decode its rows")
            # The required columns of a row, in REQUIRED_COLUMNS order, in one C call.
            self.pick = itemgetter(*(columns.index(c) for c in REQUIRED_COLUMNS))


def _cstring(buf: bytes, pos: int) -> tuple[str, int]:
    end = buf.index(b"\x00", pos)
    return buf[pos:end].decode(), end + 1


def _relation(msg: bytes, schema: str) -> tuple[int, _Relation]:
    (rel_id,) = _U32.unpack_from(msg, 1)
    namespace, pos = _cstring(msg, 5)
    name, pos = _cstring(msg, pos)
    pos += 1  # replica identity
    (ncols,) = _U16.unpack_from(msg, pos)
    pos += 2
    columns = []
    for _ in range(ncols):
        column, pos = _cstring(msg, pos + 1)  # after the flags byte
        columns.append(column)
        pos += 8  # type oid, type modifier
    return rel_id, _Relation(namespace, name, columns, schema)


def _tuple(msg: bytes, pos: int) -> list[bytes | None]:
    """The column values of a TupleData at `pos`, as byte slices (None for NULL)."""
    ncols = (msg[pos] << 8) | msg[pos + 1]
    pos += 2
    values: list[bytes | None] = []
    append = values.append
    length_at = _U32.unpack_from
    for _ in range(ncols):
        if msg[pos] == 0x74:  # 't': text
            start = pos + 5
            pos = start + length_at(msg, pos + 1)[0]
            append(msg[start:pos])
        else:  # 'n' null, 'u' unchanged TOAST (never in an insert)
            append(None)
            pos += 1
    return values


def _record(row: tuple[bytes | None, ...], commit_time: float) -> OutboxRecord:
    """The row as an OutboxRecord (the slow path, for a row that needs a dead letter)."""
    _, eid, agg_type, agg_id, etype, version, org, payload, headers, created = row
    assert eid and agg_type and agg_id and etype and payload and created
    return OutboxRecord(
        id=eid.decode(), aggregate_type=agg_type.decode(), aggregate_id=agg_id.decode(),
        type=etype.decode(), aggregate_version=None if version is None else int(version),
        org_id=None if org is None else org.decode(), payload_json=payload.decode(),
        headers_json=(headers or b"{}").decode(), occurred_at=rfc3339(created.decode()),
        commit_time=commit_time)


class LogicalRelay:
    """Streams committed outbox inserts from the slot and publishes them in commit order."""

    mode = "logical"

    def __init__(self, settings: Settings, dsn: str, publisher: BatchPublisher) -> None:
        self._settings = settings
        self._dsn = dsn
        self._publisher = publisher
        self._schema = settings.db_schema
        self._prefix = message_prefix(self._schema).encode()
        self.keeper = SlotKeeper(settings, dsn)
        self._stream: ReplicationConnection | None = None
        self._fingerprint = ""
        self._relations: dict[int, _Relation] = {}
        self._topics: dict[bytes, tuple[str, Encode | None]] = {}
        self.acked_lsn = 0  # every event before it is in Kafka
        self.acked_seq = 0
        self._acked_commit_at: float | None = None
        self._confirmed = 0  # what the server was told
        self._last_status = 0.0

    def setup(self) -> None:
        """Heal the publication, recreate the slot when it cannot be streamed as it is (with
        a backfill of what the stream will not carry), and start streaming."""
        self.close()
        self._fingerprint = self.keeper.ensure_publication()
        reason = self.keeper.why_recreate(self._fingerprint)
        if reason is None:
            record = self.keeper.record()
            assert record is not None
            stream, start = ReplicationConnection(self._dsn), 0
            self.acked_lsn = self._confirmed = record.acked_lsn
            self.acked_seq = record.acked_seq
        else:
            self._say_messages_lost(reason)
            stream, start = self.keeper.recreate(reason, self._fingerprint, self._publisher)
            self.acked_lsn = self._confirmed = start
        try:
            stream.start(self.keeper.slot, self.keeper.publication, start)
        except BaseException:
            stream.close()
            raise
        self._stream = stream
        self._relations.clear()
        log.info("stream_started", slot=self.keeper.slot, from_lsn=self.acked_lsn)

    def run_once(self) -> int:
        """Publish one batch of committed transactions; 0 when there was nothing to do (after
        waiting up to `relay_poll_interval_s` for something to arrive)."""
        assert self._stream is not None, "setup() first"
        stream, publisher = self._stream, self._publisher
        schema, relations = self._schema, self._relations
        limit = self._settings.relay_batch_size
        events = 0
        in_txn = False
        commit_time = 0.0
        batch_end: int | None = None
        batch_seq = 0
        last_commit_time: float | None = None
        commit_times: list[float] = []
        wait = self._settings.relay_poll_interval_s
        while True:
            frame = stream.read(wait if not in_txn and events == 0 else (5.0 if in_txn else 0))
            if frame is None:
                if in_txn:
                    continue  # a transaction is still arriving
                break
            msg = frame
            tag = msg[0]
            if tag == 0x49:  # 'I' insert
                rel = relations[_U32.unpack_from(msg, 1)[0]]
                if not rel.is_outbox:
                    continue
                seq = self._send_row(rel.pick(_tuple(msg, 6)), commit_time)
                events += 1
                if seq > batch_seq:
                    batch_seq = seq
            elif tag == 0x42:  # 'B'
                in_txn = True
                commit_time = (_BEGIN.unpack_from(msg, 1)[1] + PG_EPOCH_OFFSET_US) / 1e6
            elif tag == 0x43:  # 'C'
                in_txn = False
                batch_end = _COMMIT.unpack_from(msg, 1)[2]
                last_commit_time = commit_time
                commit_times.append(commit_time)
                if events >= limit:
                    break
                wait = 0
            elif tag == 0x52:  # 'R'
                rel_id, relation = _relation(msg, schema)
                relations[rel_id] = relation
            elif tag == 0x4D:  # 'M': an event emitted in message mode
                row = self._message_row(msg)
                if row is not None:
                    self._send_row(row, commit_time)
                    events += 1
        if batch_end is not None:
            publisher.settle()
            now = time.time()
            for t in commit_times:
                publisher.observe_latency(max(0.0, now - t))
            self.acked_lsn = max(self.acked_lsn, batch_end)
            self.acked_seq = max(self.acked_seq, batch_seq)
            self._acked_commit_at = last_commit_time or self._acked_commit_at
        elif stream.server_wal_end > self.acked_lsn:
            # Idle, nothing open: everything the server decoded so far was sent and acked.
            self.acked_lsn = stream.server_wal_end
        self._confirm()
        return events

    def _message_row(self, msg: bytes) -> tuple[bytes | None, ...] | None:
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

    def _say_messages_lost(self, reason: str) -> None:
        """In message mode, a slot made again cannot backfill: events emitted since the last
        acknowledged commit, until the new slot exists, exist nowhere any more. Say so."""
        mode = stored_emit_mode(self.keeper.conn)
        record = self.keeper.record()
        if mode != "message" or record is None:
            return  # table mode backfills; no record: no relay ever read this outbox
        log.error("message_events_lost", slot=self.keeper.slot, reason=reason,
                  lost_since=None if record.acked_commit_at is None
                  else record.acked_commit_at.isoformat(), lost_until="the new slot's creation",
                  action="events emitted as messages in this window are not in Kafka: "
                         "re-emit them from the application's own state")

    def _send_row(self, row: tuple[bytes | None, ...], commit_time: float) -> int:
        """Encode one outbox row (the REQUIRED_COLUMNS, as bytes) in its aggregate type's
        wire format and produce it; return its seq (0 when the row has none)."""
        seq, eid, agg_type, agg_id, etype, version, org, payload, headers, created = row
        try:
            topic, encode = self._topics.get(agg_type) or self._topic(agg_type)
            event_id, event_type = eid.decode(), etype.decode()
            if encode is None:  # the envelope, inline: the common case of the hot loop
                value = encode_value(
                    id=event_id, type=event_type, aggregate_type=agg_type.decode(),
                    aggregate_id=agg_id.decode(),
                    aggregate_version=None if version is None else int(version),
                    org_id=None if org is None else org.decode(),
                    occurred_at=rfc3339(created.decode()), payload_json=payload)
                hdrs = kafka_headers(event_id, event_type, headers)
            else:
                value, hdrs = encode(
                    event_id, event_type, agg_type.decode(), agg_id.decode(),
                    None if version is None else int(version),
                    None if org is None else org.decode(), rfc3339(created.decode()),
                    payload, headers)
        except (AttributeError, ValueError) as exc:
            raise SchemaMismatch(f"an outbox row the relay cannot decode: {exc}") from exc
        if not self._publisher.send_encoded(topic, agg_id, value, hdrs):
            self._publisher.send(_record(row, commit_time))  # too large: dead-lettered
        return 0 if seq is None else int(seq)

    def _topic(self, aggregate_type: bytes) -> tuple[str, Encode | None]:
        """The topic (ensured) of an aggregate type and its encoder, None for the envelope
        (encoded inline); cached."""
        found = self._publisher.route(aggregate_type.decode())
        entry = (found.topic, None if found.format == "envelope" else found.encode)
        self._topics[aggregate_type] = entry
        return entry

    def _confirm(self) -> None:
        """Tell the server the acknowledged position (recorded first), checking that the
        publication still covers the outbox: a gap must never be confirmed."""
        stream = self._stream
        assert stream is not None
        now = time.monotonic()
        due = now - self._last_status >= self._settings.relay_heartbeat_s
        if not (due or stream.request_status):
            return
        self._last_status = now
        if self.acked_lsn > self._confirmed:
            if self.keeper.fingerprint() != self._fingerprint:
                raise PublicationChanged("the publication no longer covers the outbox as it "
                                         "did when the slot was made")
            self.keeper.save_ack(self.acked_lsn, self._acked_commit_at, self.acked_seq)
            self._confirmed = self.acked_lsn
        # Asking for a reply makes the server report how far it has decoded (heartbeat).
        stream.send_status(self._confirmed, reply=True)

    def close(self) -> None:
        """Close the stream and the keeper's connection (the slot stays where it was
        confirmed)."""
        if self._stream is not None:
            self._stream.close()
            self._stream = None
        self.keeper.close()
