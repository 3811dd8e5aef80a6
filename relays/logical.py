"""The logical-decoding relay: a pgoutput slot read through the streaming replication
protocol, published in commit order, in three parts:

- the listener (relays/listener.py) reads the stream and decodes pgoutput into whole
  transactions' outbox rows;
- the processor (relays/processor.py) turns the rows into Kafka records and keeps the
  batch's account;
- the checkpointer (relays/checkpointer.py) owns the positions: the slot's, `relay_slot`'s,
  and in exactly-once mode the one committed in Kafka.

Each batch reads committed transactions (up to `relay_batch_size` events, or until the
stream has nothing more right now), produces every outbox row as it is decoded, then makes
the batch durable in Kafka (all acknowledged; exactly-once: committed in one Kafka
transaction with the position reached), and only then moves the positions past it.
"""

from __future__ import annotations

import psycopg
import structlog

from outbox.emit_mode import stored_emit_mode
from outbox.settings import Settings
from relays.checkpointer import Checkpointer, PublicationChanged
from relays.listener import Listener, SchemaMismatch
from relays.processor import Held, Processor
from relays.publisher import BatchPublisher
from relays.replication import ReplicationConnection, ReplicationError, int_to_lsn, lsn_to_int
from relays.slot import SlotKeeper

log = structlog.get_logger(__name__)

__all__ = ["LogicalRelay", "PublicationChanged", "SchemaMismatch"]
# Failures after which the batch in hand is given up (the stream restarts from the position).
_STREAM_FAILURES = (ReplicationError, psycopg.Error, OSError)


class LogicalRelay:
    """Streams committed outbox inserts from the slot and publishes them in commit order."""

    mode = "logical"

    def __init__(self, settings: Settings, dsn: str, publisher: BatchPublisher) -> None:
        self._settings = settings
        self._dsn = dsn
        self._publisher = publisher
        self.keeper = SlotKeeper(settings, dsn)
        self.listener = Listener(settings.db_schema)
        self.exactly_once = publisher.transactional_id is not None
        self.checkpointer = Checkpointer(settings, self.keeper, publisher,
                                         publisher.transactional_id)
        # Exactly-once, a batch is a Kafka transaction, whose commit costs as much for ten
        # events as for ten thousand (a marker in every partition it wrote): a backlog is
        # drained in transactions as large as a PostgreSQL transaction may make one.
        self._batch_limit = max(settings.relay_batch_size, settings.relay_transaction_max_events
                                if self.exactly_once else 0)
        self.processor = Processor(
            publisher,
            split_every=settings.relay_transaction_max_events if self.exactly_once else None,
            on_split=self._commit_part)

    @property
    def acked_lsn(self) -> int:
        """Every event before this position is in Kafka."""
        return self.checkpointer.acked_lsn

    def setup(self) -> None:
        """Heal the publication, recreate the slot when it cannot be streamed as it is (with
        a backfill of what the stream will not carry), read what Kafka holds (exactly-once),
        and start streaming."""
        self.close()
        self._publisher.abort_transaction()
        fingerprint = self.keeper.ensure_publication()
        reason = self.keeper.why_recreate(fingerprint)
        held = self._kafka_held() if self.exactly_once else None
        checkpointer = self.checkpointer
        if reason is None:
            record = self.keeper.record()
            assert record is not None
            stream = ReplicationConnection(self._dsn)
            start = checkpointer.resume(stream, record.acked_lsn, record.acked_seq)
        else:
            self._say_messages_lost(reason)
            stream, start = self.keeper.recreate(reason, fingerprint, self._publisher,
                                                 settle=self._settle_backfill)
            checkpointer.restart_at(stream, start)
        checkpointer.fingerprint = fingerprint
        self.processor.resume(held, start)
        self.listener.start(stream, self.keeper.slot, self.keeper.publication, start)
        log.info("stream_started", slot=self.keeper.slot, from_lsn=int_to_lsn(start),
                 exactly_once=self.exactly_once,
                 kafka_holds=None if held is None else int_to_lsn(held.end_lsn))

    def _kafka_held(self) -> Held | None:
        """What Kafka holds, unless it belongs to another WAL history (a position past
        everything this server ever wrote: a restored or replaced cluster)."""
        held = self.checkpointer.kafka_held()
        if held is None:
            return None
        now = self.keeper.conn.execute("select pg_current_wal_lsn()::text").fetchone()
        assert now is not None
        if held.commit_lsn > lsn_to_int(now[0]):
            log.error("kafka_position_ignored", commit_lsn=int_to_lsn(held.commit_lsn),
                      server_lsn=now[0], reason="past everything this server wrote: another "
                      "WAL history (a restored or replaced cluster)")
            return None
        return held

    def run_once(self) -> int:
        """Publish one batch of committed transactions; 0 when there was nothing to do (after
        waiting up to `relay_poll_interval_s` for something to arrive)."""
        processor, checkpointer = self.processor, self.checkpointer
        processor.new_batch()
        try:
            self.listener.read(processor, self._batch_limit, self._settings.relay_poll_interval_s)
        except _STREAM_FAILURES:
            self._keep_what_is_whole()
            raise
        if processor.end_lsn is not None or processor.events:
            checkpointer.batch_done(processor)
        else:
            checkpointer.idle()
        checkpointer.checkpoint()
        return processor.events

    def _keep_what_is_whole(self) -> None:
        """The stream failed mid-batch. At-least-once: the whole transactions read so far
        are settled and their position kept (the stream resumes after them, not from the
        last batch). Exactly-once: the Kafka transaction, which holds a part of one, is
        aborted."""
        if self.exactly_once:
            self._publisher.abort_transaction()
            return
        if self.processor.end_lsn is not None:
            self.checkpointer.batch_done(self.processor)

    def _commit_part(self, held: Held) -> None:
        """Exactly-once: commit the part of a large PostgreSQL transaction read so far."""
        log.info("transaction_part_committed", commit_lsn=int_to_lsn(held.commit_lsn),
                 rows=held.rows)
        self.checkpointer.commit_kafka(held, self.processor.seq)

    def _settle_backfill(self) -> None:
        """A chunk of a backfill was sent: acknowledged, or (exactly-once) committed with
        the position Kafka held before (the backfill moves no stream position)."""
        if self.exactly_once:
            self.checkpointer.commit_backfill()
        else:
            self._publisher.settle()

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

    def close(self) -> None:
        """Close the stream and the keeper's connection (the slot stays where it was
        confirmed)."""
        self.listener.close()
        self.keeper.close()
        self.checkpointer.close()

