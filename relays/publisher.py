"""The shared publish step: an idempotent confluent-kafka producer that sends a batch
asynchronously and reports success only when every message of it was acknowledged."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

import structlog
from confluent_kafka import KafkaError, KafkaException, Producer

from outbox.envelope import OutboxRecord
from outbox.kafka import TopicManager, dlq_topic, producer_config
from outbox.settings import Settings
from relays.metrics import PUBLISH_LATENCY

log = structlog.get_logger(__name__)


class PublishError(RuntimeError):
    """Some message of the batch was not acknowledged: the position must not move."""


class BatchPublisher:
    """Publishes batches of outbox records; `publish` returns only when all are acked."""

    def __init__(
        self,
        settings: Settings,
        *,
        stop_requested: Callable[[], bool],
        observe_latency: Callable[[float], None] = PUBLISH_LATENCY.observe,
        on_dead_letter: Callable[[], None] = lambda: None,
    ) -> None:
        self._prefix = settings.topic_prefix
        self._observe_latency = observe_latency
        self._producer = Producer(producer_config(settings))
        self._topics = TopicManager(settings)
        self._stop_requested = stop_requested
        self._on_dead_letter = on_dead_letter
        self._errors: list[str] = []
        self._pending = 0
        self._acks_awaited_since: float | None = None

    def _on_delivery(self, err: KafkaError | None, msg: Any, commit_time: float | None) -> None:
        self._pending -= 1
        if err is not None:
            self._errors.append(f"{msg.topic()}: {err}")
        elif commit_time is not None:
            self._observe_latency(max(0.0, time.time() - commit_time))

    def publish(self, records: Iterable[OutboxRecord], grace_s: float = 10.0) -> int:
        """Send every record (key = aggregate id) and wait for all acknowledgements.

        Raises PublishError when any message failed, or when a stop was requested and the
        acknowledgements did not arrive within `grace_s`: the caller must then not advance.
        """
        self._errors.clear()
        count = 0
        for rec in records:
            topic = rec.topic(self._prefix)
            self._topics.ensure(topic)
            try:
                self._produce(topic, rec, rec.kafka_headers())
            except KafkaException as exc:
                if exc.args[0].code() != KafkaError.MSG_SIZE_TOO_LARGE:
                    raise
                # It can never be sent: park it where it is visible, and go on.
                self._dead_letter(topic, rec, f"too large for the broker: {exc.args[0].str()}")
            count += 1
            if count % 1000 == 0:  # serve delivery callbacks now and then, not per message
                self._producer.poll(0)
        self._wait_for_acks(grace_s)
        if self._errors:
            first = self._errors[0]
            raise PublishError(f"{len(self._errors)} of {count} messages failed, first: {first}")
        return count

    def _produce(self, topic: str, rec: OutboxRecord, headers: list[tuple[str, bytes]]) -> None:
        ct = rec.commit_time
        while True:
            try:
                self._producer.produce(
                    topic,
                    key=rec.aggregate_id.encode(),
                    value=rec.value(),
                    headers=headers,
                    on_delivery=lambda err, msg: self._on_delivery(err, msg, ct),
                )
                break
            except BufferError:  # local queue full: bounded memory, wait for acks
                self._producer.poll(0.05)
        self._pending += 1

    def _dead_letter(self, topic: str, rec: OutboxRecord, reason: str) -> None:
        dead = dlq_topic(topic, "relay")
        self._topics.ensure(dead)
        headers = [("reason", reason.encode()), ("source_topic", topic.encode()),
                   ("payload_omitted", b"true"), *rec.kafka_headers()]
        self._produce(dead, rec.without_payload(), headers)
        self._on_dead_letter()
        log.error("row_dead_lettered", topic=dead, id=rec.id, reason=reason)

    def _wait_for_acks(self, grace_s: float) -> None:
        stop_deadline: float | None = None
        self._acks_awaited_since = time.monotonic()
        try:
            while self._pending > 0:
                self._producer.flush(0.5)
                if self._stop_requested():
                    stop_deadline = stop_deadline or time.monotonic() + grace_s
                    if time.monotonic() > stop_deadline:
                        raise PublishError(
                            f"stopping with {self._pending} messages unacknowledged")
        finally:
            self._acks_awaited_since = None

    def seconds_awaiting_acks(self) -> float:
        """How long the batch in hand has waited for the broker (0 when none waits); the
        producer itself retries until `message.timeout.ms`, so an outage shows here first."""
        since = self._acks_awaited_since
        return 0.0 if since is None else time.monotonic() - since

    def close(self, timeout_s: float = 5.0) -> None:
        """Flush what is left and release the producer."""
        self._producer.flush(timeout_s)
