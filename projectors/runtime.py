"""The consumer runtime every projector runs in.

Poll a batch, decode it (undecodable messages go to `<topic>.dlq.<projector>` with the
reason in headers), hand it to the projector, and commit the offsets of exactly what was
applied, never before. A batch is applied and committed before the next poll, so a rebalance
never finds applied-but-uncommitted work; a revocation during a retry abandons the batch
(it is redelivered to the new owner). A batch runs on an applier thread while this one keeps
polling with the partitions paused, so a batch longer than `max.poll.interval.ms` (many OCR
images) keeps the group membership. Errors, always with the partitions paused: an
unreachable sink (see `transient_errors`, plus the projector's own outages) is retried
until it is back or the process stops; any other error gets bounded retries, then each
message is applied alone and the ones that still fail go to the DLQ. A batch that is
neither applied nor dead-lettered is handed back: the consumer seeks to its first
offsets, nothing after it is committed. Each event carries its trace id (and, while
tracing is on, an apply span) from its Kafka headers: see `projectors/apply_spans.py`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor, wait
from datetime import UTC, datetime

import structlog
from confluent_kafka import (
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    TopicPartition,
)

from outbox import tracing
from outbox.envelope import EventEnvelope
from outbox.kafka import TopicManager, dlq_topic, make_consumer, make_producer
from outbox.readiness import CachedProbes, Probe, kafka_probe, missing, ok, readiness_report
from outbox.wire_formats import decode_record, event_topic
from projectors.apply_spans import end_apply_spans, note_retry, start_apply_spans, traceparent
from projectors.lag import LagClock
from projectors.metrics import (
    APPLIED,
    BATCH_SECONDS,
    DEAD_LETTERS,
    LAG_SECONDS,
    PICKUP_SECONDS,
    RETRIES,
    start_counting,
)
from projectors.settings import RuntimeSettings
from projectors.spec import Projector
from projectors.transient_errors import TransientCheck, is_transient

log = structlog.get_logger(__name__)
# A batch that takes longer than this starts the keep-alive polling (fast batches never
# pause and resume their partitions).
KEEPALIVE_AFTER_S = 1.0


class BatchInterrupted(Exception):
    """Raised by a projector that stopped mid-batch on request: what it finished is
    durable and idempotent, the rest is handed back uncommitted."""


__all__ = ["BatchInterrupted", "ConsumerRuntime", "Projector", "live_group"]


def live_group(settings: RuntimeSettings, name: str) -> str:
    """The consumer group of the live projector `name`."""
    return f"{settings.topic_prefix}.{name}"


class ConsumerRuntime:
    """Runs one projector in a consumer group until `stop` is set."""

    def __init__(self, settings: RuntimeSettings, projector: Projector, *,
                 group_id: str | None = None, stop: threading.Event | None = None,
                 abandon: threading.Event | None = None, track_end: bool = False,
                 sink_probes: Mapping[str, Probe] | None = None,
                 transient: TransientCheck = is_transient) -> None:
        """`abandon`: set while the batch in hand was revoked (a projector that can stop
        between items checks it, as it checks `stop`). `track_end`: note in `at_end` the
        partitions read to their end (a replay uses it to know it has read the whole log).
        `sink_probes`: by name, a cheap call to each store the projector writes, for
        `/readyz`. `transient`: which errors are outages to wait out (the generic ones by
        default; see `transient_errors.transient_check`)."""
        self.settings = settings
        self._is_transient = transient
        self.projector = projector
        self.stop = stop or threading.Event()
        self.abandon = abandon or threading.Event()
        self._applier = ThreadPoolExecutor(1, thread_name_prefix=f"apply-{projector.name}")
        self.group_id = group_id or live_group(settings, projector.name)
        self.topics = [event_topic(settings, t) for t in projector.aggregate_types]
        self.last_applied_at: float | None = None
        self.applied = 0  # events applied and committed by this runtime
        self.sink_unavailable_since: float | None = None
        self._revoked = False
        self._assigned = 0
        self._joined = False  # a member of its group (possibly with no partition)
        self._loop_at = time.monotonic()
        self._probes = CachedProbes({"broker": kafka_probe(settings), **(sink_probes or {})})
        self._dlq_errors: list[str] = []
        self.at_end: set[tuple[str, int]] = set()
        self.lag = LagClock()
        start_counting(projector.name)
        if self.group_id == live_group(settings, projector.name):
            # Read at every scrape; a rebuild's replay (a group of its own) is not the
            # projector's lag.
            LAG_SECONDS.labels(projector.name).set_function(self.lag.seconds)
        self._consumer = make_consumer(
            settings, self.group_id, settings.projector_session_timeout_ms,
            **{"max.poll.interval.ms": settings.projector_max_poll_interval_ms,
               "fetch.wait.max.ms": settings.projector_fetch_wait_max_ms},
            **({"enable.partition.eof": True} if track_end else {}))
        self._dlq = make_producer(settings)
        self._topic_admin = TopicManager(settings)

    def health(self) -> dict[str, object]:
        """Report for `/healthz`: `status` is `sink_unavailable` while an outage is waited
        out (the process is alive all the same; `/readyz` says it is not ready)."""
        return {"status": "ok" if self.sink_unavailable_since is None else "sink_unavailable",
                "projector": self.projector.name, "group": self.group_id,
                "last_applied_at": self.last_applied_at,
                "assigned_partitions": self._assigned,
                "sink_unavailable_since": self.sink_unavailable_since}

    def readiness(self) -> dict[str, object]:
        """Report for `/readyz`: ready when the broker answers, the consumer is a member of
        its group (with partitions, or none left for it), every store it writes answers, and
        no outage of one is being waited out."""
        checks = self._probes.results()
        checks["group"] = ok(assigned_partitions=self._assigned) if self._joined else \
            missing("not_joined", "not yet a member of its consumer group",
                    assigned_partitions=0)
        since = self.sink_unavailable_since
        checks["sink_writes"] = ok() if since is None else \
            missing("sink_unavailable",
                    f"a batch waits for an unreachable store since {since:.0f}")
        return readiness_report(checks, projector=self.projector.name, group=self.group_id)

    def stalled(self) -> str | None:
        """Why liveness fails: the consumer loop has not polled for the group's poll
        interval, after which the broker has evicted it anyway. None while alive."""
        idle = time.monotonic() - self._loop_at
        limit = self.settings.projector_max_poll_interval_ms / 1000
        return f"no poll for {idle:.0f}s" if idle > limit else None

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._revoked = True
        self.abandon.set()
        self._assigned = 0
        self.lag.revoked()
        log.info("partitions_revoked", partitions=[(p.topic, p.partition) for p in partitions])

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._assigned = len(partitions)  # eager assignment: the whole set each time
        self._joined = True
        log.info("partitions_assigned", partitions=[(p.topic, p.partition) for p in partitions])

    def run(self) -> None:
        """Consume, apply, commit; on stop, finish the batch in hand, commit, leave the group."""
        try:
            if not self._wait_for_topics():
                return
            self._consumer.subscribe(self.topics, on_assign=self._on_assign,
                                     on_revoke=self._on_revoke)
            log.info("projector_started", projector=self.projector.name, topics=self.topics)
            while not self.stop.is_set():
                self._loop_at = time.monotonic()
                # The first message as soon as it comes, then what is already fetched:
                # consume(n, t) alone waits out t for a short batch (a hop's latency), and
                # during a burst the batch fills while the one before is applied.
                first = self._consumer.poll(0.5)
                if first is None:
                    self.lag.nothing_new()
                else:
                    more = self.settings.projector_batch_size - 1
                    self._handle([first, *(self._consumer.consume(more, 0)
                                           if more else [])])
        finally:
            self._consumer.close()  # leaves the group at once, so a rebalance is quick
            self._applier.shutdown()
            self._dlq.flush(10)
            self.projector.close()
            log.info("projector_stopped", projector=self.projector.name)

    def _wait_for_topics(self) -> bool:
        """Create the topics unless they exist, waiting for the broker for as long as it is
        unreachable (the process stays up, not ready); False when stopped meanwhile."""
        backoff = 0.5
        while not self.stop.is_set():
            self._loop_at = time.monotonic()
            try:
                for topic in self.topics:
                    self._topic_admin.ensure(topic)
                return True
            except KafkaException as exc:
                log.warning("broker_unavailable", projector=self.projector.name,
                            error=str(exc)[:300], backoff_s=backoff)
                self.stop.wait(backoff)
                backoff = min(backoff * 2, 10.0)
        return False

    def _handle(self, msgs: list[Message]) -> None:
        self._revoked = False
        self.abandon.clear()
        self._dlq_errors.clear()
        items: list[tuple[Message, EventEnvelope]] = []
        ends: set[tuple[str, int]] = set()  # read to the end: noted once committed
        for msg in msgs:
            err = msg.error()
            if err is not None:
                if err.code() == KafkaError._PARTITION_EOF:
                    ends.add((msg.topic(), msg.partition()))
                else:
                    log.warning("consume_error", error=str(err))
                continue
            self.at_end.discard((msg.topic(), msg.partition()))
            try:
                items.append((msg, decode_record(msg.key(), msg.value(), msg.headers())))
            except ValueError as exc:  # UndecodableRecord, with the reason
                self._dead_letter(msg, f"undecodable: {exc}".replace("\n", " ")[:500])
        self.lag.batch_received(env.occurred_at for _, env in items)
        start_apply_spans(self.projector.name, self.group_id, items)
        applied = False
        try:
            applied = self._apply_batch(msgs, items, ends)
        finally:
            end_apply_spans(self.projector.name, [env for _, env in items],
                            "applied" if applied else "handed_back")

    def _apply_batch(self, msgs: list[Message], items: list[tuple[Message, EventEnvelope]],
                     ends: set[tuple[str, int]]) -> bool:
        """Apply the decoded events and commit the batch; False when it was handed back."""
        start, now = time.perf_counter(), datetime.now(UTC)
        pickup = PICKUP_SECONDS.labels(self.projector.name)
        for _, env in items:
            pickup.observe(max(0.0, (now - env.occurred_at).total_seconds()))
        if not self._apply_with_retries(items):
            self._hand_back(msgs)
            return False
        BATCH_SECONDS.labels(self.projector.name).observe(time.perf_counter() - start)
        # Dead letters are durable before their offsets are committed.
        if self._dlq.flush(30) or self._dlq_errors:
            log.error("dead_letter_failed", projector=self.projector.name,
                      errors=self._dlq_errors[:3])
            self._hand_back(msgs)
            self._paused_wait(1.0)
            return False
        self._commit(msgs)
        self.at_end |= ends
        if items:
            self.applied += len(items)
            APPLIED.labels(self.projector.name).inc(len(items))
            self.last_applied_at = time.time()
        self.lag.batch_applied(env.occurred_at for _, env in items)
        return True

    def _hand_back(self, msgs: list[Message]) -> None:
        """Seek back to the first offset of each partition of an unfinished batch, so it
        is consumed again (by this process, or by the new owner after a revocation)."""
        if self._revoked:
            return  # the new assignment starts from the committed offsets anyway
        first: dict[tuple[str, int], int] = {}
        for m in msgs:
            if m.error() is None:
                key = (m.topic(), m.partition())
                first[key] = min(first.get(key, m.offset()), m.offset())
        for (topic, partition), offset in first.items():
            self._consumer.seek(TopicPartition(topic, partition, offset))

    def _apply_with_retries(self, items: list[tuple[Message, EventEnvelope]]) -> bool:
        """Apply the batch; False when it was not finished (revoked, stopping)."""
        if not items:
            return True
        events = [env for _, env in items]
        attempt = failures = 0
        while True:
            try:
                self._apply(events)
                self.sink_unavailable_since = None
                return True
            except BatchInterrupted:
                return False
            except Exception as exc:  # the sink decides what is retriable by raising
                transient = self._is_transient(exc)
                if transient:
                    self.sink_unavailable_since = self.sink_unavailable_since or time.time()
                else:
                    failures += 1
                    if failures > self.settings.projector_max_retries:
                        log.error("batch_failed", projector=self.projector.name,
                                  error=str(exc))
                        break
                RETRIES.labels(self.projector.name).inc()
                note_retry(events, str(exc))
                backoff = min(0.2 * 2 ** min(attempt, 5), 5.0)
                attempt += 1
                log.warning("sink_unavailable" if transient else "batch_retry",
                            projector=self.projector.name, error=str(exc)[:300],
                            attempt=attempt, backoff_s=backoff)
                if not self._paused_wait(backoff):
                    return False
        for msg, env in items:  # isolate the poison message(s); the rest are applied
            try:
                self._apply([env])
            except BatchInterrupted:
                return False
            except Exception as exc:
                if self._is_transient(exc):  # the sink went away: not this message's fault
                    return False
                reason = f"apply failed: {exc}".replace("\n", " ")[:500]
                env.trace.failed(reason)
                self._dead_letter(msg, reason)
        return True

    def _apply(self, events: list[EventEnvelope]) -> None:
        """Run the projector on the applier thread; past KEEPALIVE_AFTER_S, poll with the
        partitions paused until it returns, so the consumer stays in its group. Re-raises
        what the projector raised."""
        future = self._applier.submit(self.projector.apply, events)
        if wait([future], KEEPALIVE_AFTER_S).not_done:
            assignment = self._consumer.assignment()
            self._consumer.pause(assignment)
            try:
                while not future.done():
                    self._poll_paused(0.2)
            finally:
                if not self._revoked:
                    self._consumer.resume(assignment)
        future.result()

    def _paused_wait(self, seconds: float) -> bool:
        """Wait with the partitions paused (no fetching, no spinning) while still serving
        group callbacks. False when the partitions were revoked or a stop was requested."""
        assignment = self._consumer.assignment()
        self._consumer.pause(assignment)
        deadline = time.monotonic() + seconds
        try:
            while time.monotonic() < deadline and not self._revoked and not self.stop.is_set():
                self._poll_paused(min(0.2, max(0.0, deadline - time.monotonic())))
        finally:
            if not self._revoked:
                self._consumer.resume(assignment)
        return not self._revoked and not self.stop.is_set()

    def _poll_paused(self, timeout_s: float) -> None:
        """One poll that serves group callbacks and the poll-interval timer. A message can
        only come from a partition assigned meanwhile (not paused): it is read again later
        rather than skipped."""
        self._loop_at = time.monotonic()
        msg = self._consumer.poll(timeout_s)
        if msg is not None and msg.error() is None:
            self._consumer.seek(TopicPartition(msg.topic(), msg.partition(), msg.offset()))

    def _dead_letter(self, msg: Message, reason: str) -> None:
        topic = dlq_topic(msg.topic() or "unknown", self.projector.name)
        self._topic_admin.ensure(topic)
        headers = [("reason", reason.encode()), ("projector", self.projector.name.encode()),
                   ("source_topic", (msg.topic() or "").encode()),
                   ("source_partition", str(msg.partition()).encode()),
                   ("source_offset", str(msg.offset()).encode())]
        try:
            self._dlq.produce(topic, key=msg.key(), value=msg.value(),
                              headers=headers + list(msg.headers() or []),
                              on_delivery=self._on_dead_letter_delivery)
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.MSG_SIZE_TOO_LARGE:
                raise
            # The letter is larger than the message was (its headers): keep the reason and
            # where the original sits, which is still in the source topic.
            self._dlq.produce(topic, key=msg.key(), value=None,
                              headers=[*headers, ("payload_omitted", b"true")],
                              on_delivery=self._on_dead_letter_delivery)
        DEAD_LETTERS.labels(self.projector.name).inc()
        log.warning("dead_lettered", topic=topic, offset=msg.offset(), reason=reason[:200],
                    trace_id=tracing.trace_id_of(traceparent(msg)))

    def _on_dead_letter_delivery(self, err: KafkaError | None, msg: Message) -> None:
        if err is not None:
            self._dlq_errors.append(str(err))

    def _commit(self, msgs: list[Message]) -> None:
        next_offsets: dict[tuple[str, int], int] = {}
        for m in msgs:
            if m.error() is None:
                key = (m.topic(), m.partition())
                next_offsets[key] = max(next_offsets.get(key, 0), m.offset() + 1)
        if not next_offsets:
            return
        try:
            self._consumer.commit(
                offsets=[TopicPartition(t, p, o) for (t, p), o in next_offsets.items()],
                asynchronous=False)
        except KafkaException as exc:
            # Rebalancing, or the coordinator is away: the batch is applied, and applying it
            # again on redelivery is harmless, so go on.
            log.warning("commit_failed", projector=self.projector.name, error=str(exc))
