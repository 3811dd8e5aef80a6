"""The third part of the logical relay: it owns the positions.

- `relay_slot.acked_lsn`: how far Kafka acknowledged (at-least-once) or committed
  (exactly-once). Recorded after every batch (at most every `_SAVE_EVERY_S`), so a restarted
  relay re-sends at most about one batch; a relay that keeps running resumes from the
  position it holds in memory, even when the database was gone when it was to be recorded.
- The slot's confirmed position: sent to the server every `relay_heartbeat_s`, never past
  the record (the slot never moves past an event Kafka does not have). An idle stream is
  moved along too: the server's reply to a status request says how far it has decoded, and
  with no transaction open, nothing before that position is left to publish.
- Exactly-once mode, the position in Kafka, committed in the same Kafka transaction as the
  records (as Kafka Connect's exactly-once source connectors do, KIP-618), twice:
  - a position record (topic `relay_positions_topic`, key the transactional id), JSON, for
    people and tools: the LSNs, the transaction's id and the one committed before it;
  - the offsets of the consumer group named after the transactional id on that topic's
    partitions 0 to 3: the end LSN, the commit LSN, the rows held of a PostgreSQL
    transaction published in parts (plus one; 0 when whole), and the Kafka transaction's
    id. This is what the relay reads on start: a transactional offset commit is visible
    once its transaction committed and never otherwise, on any broker, whereas the local
    broker lets an aborted transaction's records through to `read_committed` readers, and
    it keeps no offset metadata (docs/concepts/exactly-once.md).
"""

from __future__ import annotations

import time
from typing import Any

import orjson
import structlog
from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition
from confluent_kafka.admin import NewTopic
from psycopg.conninfo import conninfo_to_dict

from outbox.kafka import make_admin, make_reader
from outbox.pg_names import slot_name
from outbox.settings import Settings
from relays.processor import Held, Processor
from relays.publisher import BatchPublisher, PublishError
from relays.replication import ReplicationConnection, int_to_lsn
from relays.slot import SlotKeeper

log = structlog.get_logger(__name__)

# The record of what Kafka holds is written at most this often (a restart re-sends what
# came after it).
_SAVE_EVERY_S = 0.1


def transactional_id(settings: Settings, dsn: str) -> str | None:
    """The logical relay's transactional id (and position group) in exactly-once mode, None
    otherwise: the setting, or `outbox-relay.<database>.<slot>`."""
    if not settings.relay_exactly_once:
        return None
    dbname = conninfo_to_dict(dsn).get("dbname", "")
    return (settings.relay_transactional_id
            or f"outbox-relay.{dbname}.{slot_name(settings.db_schema)}")


# The position's fields, by the partition of the positions topic whose offset holds each.
END_LSN, COMMIT_LSN, ROWS, TXN = range(4)
POSITION_PARTITIONS = 4


def ensure_positions_topic(settings: Settings) -> None:
    """Create the positions topic (one partition per position field) unless it exists; one
    with too few partitions is refused with what to do."""
    admin = make_admin(settings)
    topic = settings.relay_positions_topic
    found = admin.list_topics(timeout=10).topics.get(topic)
    if found is None:
        created = admin.create_topics([NewTopic(topic, POSITION_PARTITIONS)])[topic]
        try:
            created.result(timeout=30)
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise
        return
    if len(found.partitions) < POSITION_PARTITIONS:
        raise PublishError(
            f"the positions topic {topic} has {len(found.partitions)} partitions, the relay "
            f"needs {POSITION_PARTITIONS}: delete it (with no relay running) or name another "
            "in OUTBOX_RELAY_POSITIONS_TOPIC")


def read_position(reader: Consumer, topic: str) -> tuple[Held, int] | None:
    """What Kafka holds and the id of the last committed transaction, from the offsets of
    `reader`'s group (the transactional id) on `topic`; None when it never committed."""
    try:
        found = reader.committed([TopicPartition(topic, p) for p in range(POSITION_PARTITIONS)],
                                 timeout=30)
    except KafkaException as exc:
        raise PublishError(f"could not read the position in Kafka: {exc}") from exc
    offsets = [tp.offset for tp in found]
    if min(offsets) < 0:  # never committed (a negative offset is the client's "none")
        return None
    rows = offsets[ROWS] - 1
    return (Held(offsets[COMMIT_LSN], offsets[END_LSN], None if rows < 0 else rows),
            offsets[TXN])


def kafka_position(settings: Settings, txn_id: str) -> dict[str, Any] | None:
    """The exactly-once relay's position in Kafka, for people (`outbox relay status`)."""
    reader = make_reader(settings, txn_id, log_level=0)
    try:
        found = read_position(reader, settings.relay_positions_topic)
    finally:
        reader.close()
    if found is None:
        return None
    held, txn = found
    return {"end_lsn": int_to_lsn(held.end_lsn), "commit_lsn": int_to_lsn(held.commit_lsn),
            "rows_of_a_transaction_in_parts": held.rows, "last_transaction": txn}


class PublicationChanged(RuntimeError):
    """The publication stopped covering the outbox, or was made again: inserts may have
    been skipped by the stream, so the slot must be recreated with a backfill."""


class Checkpointer:
    """Records, confirms and (exactly-once) commits to Kafka the position reached."""

    def __init__(self, settings: Settings, keeper: SlotKeeper, publisher: BatchPublisher,
                 txn_id: str | None) -> None:
        self._settings = settings
        self._keeper = keeper
        self._publisher = publisher
        self.txn_id = txn_id  # exactly-once when set
        self._topic = settings.relay_positions_topic
        self._reader: Consumer | None = None
        self.last_committed_txn: int | None = None
        self.held = Held(0, 0)  # what Kafka holds (exactly-once), as last read or committed
        self.acked_lsn = 0  # every event before it is in Kafka
        self.acked_seq = 0
        self._acked_commit_at: float | None = None
        self._saved = 0  # what relay_slot says
        self._last_save = 0.0
        self._confirmed = 0  # what the server was told
        self._last_status = 0.0
        self._stream: ReplicationConnection | None = None
        self.fingerprint = ""  # the publication's, when the slot was made

    def resume(self, stream: ReplicationConnection, acked_lsn: int, acked_seq: int) -> int:
        """Follow `stream`, whose slot's record says `acked_lsn`; return where to stream
        from: the record, or further when this process acknowledged more than it could
        record (the database went away)."""
        self._stream = stream
        self.acked_lsn = max(self.acked_lsn, acked_lsn)
        self.acked_seq = max(self.acked_seq, acked_seq)
        self._saved = acked_lsn
        self._confirmed = acked_lsn
        return self.acked_lsn

    def restart_at(self, stream: ReplicationConnection, lsn: int) -> None:
        """Follow `stream` of a slot made again at `lsn` (its record says so already)."""
        self._stream = stream
        self.acked_lsn = self._saved = self._confirmed = lsn

    def kafka_held(self) -> Held | None:
        """Exactly-once: take over the transactional id (fencing any other holder and
        aborting what it left open), then read the position Kafka holds; None when it holds
        none."""
        assert self.txn_id is not None
        self._publisher.init_transactions()
        ensure_positions_topic(self._settings)
        if self._reader is None:
            self._reader = make_reader(self._settings, self.txn_id)
        found = read_position(self._reader, self._topic)
        if found is None:
            log.info("kafka_position", transactional_id=self.txn_id, held="nothing")
            self.held = Held(0, 0)
            return None
        held, self.last_committed_txn = found
        self.held = held
        log.info("kafka_position", transactional_id=self.txn_id,
                 commit_lsn=int_to_lsn(held.commit_lsn), end_lsn=int_to_lsn(held.end_lsn),
                 rows=held.rows, txn=self.last_committed_txn)
        return held

    def batch_done(self, processor: Processor) -> None:
        """The batch was read: make it durable in Kafka (acknowledged, or committed with its
        position), then move the positions."""
        if self.txn_id is not None:
            # A batch whose rows Kafka held already needs no commit, unless the position in
            # Kafka is inside a transaction this batch finished.
            if self._publisher.txn_id is not None or (
                    processor.end_lsn is not None and self.held.rows is not None):
                self.commit_kafka(processor.position(), processor.seq)
        elif processor.events:
            self._publisher.settle()
        if processor.events:
            now = time.time()
            for t in processor.commit_times:
                self._publisher.observe_latency(max(0.0, now - t))
        if processor.end_lsn is not None:
            self.acked_lsn = max(self.acked_lsn, processor.end_lsn)
            self.acked_seq = max(self.acked_seq, processor.seq)
            self._acked_commit_at = processor.last_commit_time or self._acked_commit_at

    def commit_backfill(self) -> None:
        """Exactly-once: commit a chunk of a backfill, with the position Kafka held before
        (a backfill moves no stream position)."""
        if self._publisher.txn_id is not None:
            self.commit_kafka(self.held, 0, backfill=True)

    def commit_kafka(self, held: Held, seq: int, backfill: bool = False) -> None:
        """Exactly-once: commit the open Kafka transaction with `held` as its position (a
        part of a large PostgreSQL transaction when `held.rows` is set)."""
        assert self.txn_id is not None and self._reader is not None
        txn = self._publisher.ensure_transaction()
        record = {"transactional_id": self.txn_id, "slot": self._keeper.slot, "txn": txn,
                  "prev_txn": self.last_committed_txn, "commit_lsn": held.commit_lsn,
                  "end_lsn": held.end_lsn, "rows": held.rows, "seq": seq,
                  "backfill": backfill, "lsn": int_to_lsn(held.end_lsn)}
        fields = {END_LSN: held.end_lsn, COMMIT_LSN: held.commit_lsn,
                  ROWS: 0 if held.rows is None else held.rows + 1, TXN: txn}
        self._publisher.commit_transaction(
            self._topic, self.txn_id.encode(), orjson.dumps(record),
            [TopicPartition(self._topic, p, offset) for p, offset in fields.items()],
            self._reader.consumer_group_metadata())
        self.last_committed_txn = txn
        self.held = held

    def idle(self) -> None:
        """Nothing was read: with no transaction open, every commit the server decoded so
        far was published (or had nothing to publish)."""
        stream = self._stream
        assert stream is not None
        if stream.server_wal_end > self.acked_lsn:
            self.acked_lsn = stream.server_wal_end

    def checkpoint(self) -> None:
        """Record the position (at most every `_SAVE_EVERY_S`) and tell the server (every
        `relay_heartbeat_s`, or when it asks), checking that the publication still covers
        the outbox: a gap must never be confirmed."""
        stream = self._stream
        assert stream is not None
        now = time.monotonic()
        due = now - self._last_status >= self._settings.relay_heartbeat_s
        if self.acked_lsn > self._saved and (due or now - self._last_save >= _SAVE_EVERY_S):
            self._keeper.save_ack(self.acked_lsn, self._acked_commit_at, self.acked_seq)
            self._saved = self.acked_lsn
            self._last_save = now
        if not (due or stream.request_status):
            return
        self._last_status = now
        if self._saved > self._confirmed:
            if self._keeper.fingerprint() != self.fingerprint:
                raise PublicationChanged("the publication no longer covers the outbox as it "
                                         "did when the slot was made")
            self._confirmed = self._saved
        # Asking for a reply makes the server report how far it has decoded (heartbeat).
        stream.send_status(self._confirmed, reply=True)

    def close(self) -> None:
        """Release the position reader."""
        if self._reader is not None:
            self._reader.close()
            self._reader = None
