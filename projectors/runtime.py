"""The consumer runtime every projector runs in.

Poll a batch, decode it (undecodable messages go to `<topic>.dlq.<projector>` with the
reason in headers), hand it to the projector, and commit the offsets of exactly what was
applied, never before. A batch is applied and committed before the next poll, so a rebalance
never finds applied-but-uncommitted work; a revocation during a retry abandons the batch
(it is redelivered to the new owner). Errors: bounded retries with backoff while the
partitions are paused; then each message alone, and the ones that still fail go to the DLQ.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Protocol

import structlog
from confluent_kafka import Consumer, KafkaError, Message, Producer, TopicPartition
from pydantic import ValidationError

from outbox.envelope import EventEnvelope
from outbox.settings import Settings
from projectors.metrics import APPLIED, BATCH_SECONDS, DEAD_LETTERS, LAG_SECONDS, RETRIES
from relays.publisher import TopicManager, producer_config

log = structlog.get_logger(__name__)


class Projector(Protocol):
    """What a projector provides to the runtime."""

    name: str
    aggregate_types: Sequence[str]

    def apply(self, events: list[EventEnvelope]) -> None:
        """Apply a batch (idempotently: events may be redelivered). Raise to retry."""
        ...

    def close(self) -> None:
        """Release clients."""
        ...


def dlq_topic(topic: str, projector: str) -> str:
    """The dead-letter topic of `projector` for messages from `topic`."""
    return f"{topic}.dlq.{projector}"


class ConsumerRuntime:
    """Runs one projector in a consumer group until `stop` is set."""

    def __init__(self, settings: Settings, projector: Projector, *,
                 group_id: str | None = None, stop: threading.Event | None = None) -> None:
        self.settings = settings
        self.projector = projector
        self.stop = stop or threading.Event()
        self.group_id = group_id or f"{settings.topic_prefix}.{projector.name}"
        self.topics = [f"{settings.topic_prefix}.{t}" for t in projector.aggregate_types]
        self.last_applied_at: float | None = None
        self._revoked = False
        self._consumer = Consumer({
            "bootstrap.servers": settings.kafka_bootstrap,
            "group.id": self.group_id,
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            "session.timeout.ms": settings.projector_session_timeout_ms,
            "heartbeat.interval.ms": max(500, settings.projector_session_timeout_ms // 5),
            "partition.assignment.strategy": "range",
        })
        self._dlq = Producer(producer_config(settings))
        self._topic_admin = TopicManager(settings)

    def health(self) -> dict[str, object]:
        """Liveness report for `/healthz`."""
        return {"status": "ok", "projector": self.projector.name, "group": self.group_id,
                "last_applied_at": self.last_applied_at}

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._revoked = True
        log.info("partitions_revoked", partitions=[(p.topic, p.partition) for p in partitions])

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        log.info("partitions_assigned", partitions=[(p.topic, p.partition) for p in partitions])

    def run(self) -> None:
        """Consume, apply, commit; on stop, finish the batch in hand, commit, leave the group."""
        for topic in self.topics:
            self._topic_admin.ensure(topic)
        self._consumer.subscribe(self.topics, on_assign=self._on_assign,
                                 on_revoke=self._on_revoke)
        log.info("projector_started", projector=self.projector.name, topics=self.topics)
        try:
            while not self.stop.is_set():
                msgs = self._consumer.consume(self.settings.projector_batch_size, 0.5)
                if msgs:
                    self._handle(msgs)
        finally:
            self._consumer.close()  # leaves the group at once, so a rebalance is quick
            self._dlq.flush(10)
            self.projector.close()
            log.info("projector_stopped", projector=self.projector.name)

    def _handle(self, msgs: list[Message]) -> None:
        self._revoked = False
        items: list[tuple[Message, EventEnvelope]] = []
        for msg in msgs:
            err = msg.error()
            if err is not None:
                if err.code() != KafkaError._PARTITION_EOF:
                    log.warning("consume_error", error=str(err))
                continue
            try:
                items.append((msg, EventEnvelope.from_json(msg.value() or b"")))
            except (ValidationError, ValueError) as exc:
                self._dead_letter(msg, f"undecodable: {exc}".replace("\n", " ")[:500])
        start = time.perf_counter()
        if not self._apply_with_retries(items):
            return  # partitions revoked meanwhile: the new owner gets the batch
        BATCH_SECONDS.labels(self.projector.name).observe(time.perf_counter() - start)
        self._dlq.flush(30)  # dead letters are durable before their offsets are committed
        self._commit(msgs)
        if items:
            APPLIED.labels(self.projector.name).inc(len(items))
            last = max(env.occurred_at for _, env in items)
            LAG_SECONDS.labels(self.projector.name).set(
                max(0.0, (datetime.now(UTC) - last).total_seconds()))
            self.last_applied_at = time.time()

    def _apply_with_retries(self, items: list[tuple[Message, EventEnvelope]]) -> bool:
        if not items:
            return True
        events = [env for _, env in items]
        for attempt in range(self.settings.projector_max_retries + 1):
            try:
                self.projector.apply(events)
                return True
            except Exception as exc:  # the sink decides what is retriable by raising
                if attempt == self.settings.projector_max_retries:
                    log.error("batch_failed", projector=self.projector.name, error=str(exc))
                    break
                RETRIES.labels(self.projector.name).inc()
                backoff = min(0.2 * 2**attempt, 5.0)
                log.warning("batch_retry", projector=self.projector.name, error=str(exc),
                            attempt=attempt + 1, backoff_s=backoff)
                if not self._paused_wait(backoff):
                    return False
        for msg, env in items:  # isolate the poison message(s); the rest are applied
            try:
                self.projector.apply([env])
            except Exception as exc:
                self._dead_letter(msg, f"apply failed: {exc}".replace("\n", " ")[:500])
        return True

    def _paused_wait(self, seconds: float) -> bool:
        """Wait with the partitions paused (no fetching, no spinning) while still serving
        group callbacks. False when the partitions were revoked meanwhile."""
        assignment = self._consumer.assignment()
        self._consumer.pause(assignment)
        deadline = time.monotonic() + seconds
        try:
            while time.monotonic() < deadline and not self._revoked:
                self._consumer.poll(min(0.2, max(0.0, deadline - time.monotonic())))
        finally:
            if not self._revoked:
                self._consumer.resume(assignment)
        return not self._revoked

    def _dead_letter(self, msg: Message, reason: str) -> None:
        topic = dlq_topic(msg.topic() or "unknown", self.projector.name)
        self._topic_admin.ensure(topic)
        headers = [("reason", reason.encode()), ("projector", self.projector.name.encode()),
                   ("source_topic", (msg.topic() or "").encode()),
                   ("source_partition", str(msg.partition()).encode()),
                   ("source_offset", str(msg.offset()).encode())]
        self._dlq.produce(topic, key=msg.key(), value=msg.value(),
                          headers=headers + list(msg.headers() or []))
        DEAD_LETTERS.labels(self.projector.name).inc()
        log.warning("dead_lettered", topic=topic, offset=msg.offset(), reason=reason[:200])

    def _commit(self, msgs: list[Message]) -> None:
        next_offsets: dict[tuple[str, int], int] = {}
        for m in msgs:
            if m.error() is None:
                key = (m.topic(), m.partition())
                next_offsets[key] = max(next_offsets.get(key, 0), m.offset() + 1)
        if next_offsets:
            self._consumer.commit(
                offsets=[TopicPartition(t, p, o) for (t, p), o in next_offsets.items()],
                asynchronous=False)
