"""The shared publish step: an idempotent producer that sends records as they come and
settles a batch only when Kafka acknowledged every message of it.

- No message ever times out (`message.timeout.ms = 0`): during a broker outage of any length
  librdkafka keeps every message queued and retries it in order, so per-aggregate order
  holds; a batch that is re-sent after a restart repeats versions, it never skips ahead.
- Delivery reports come only for failures (`delivery.report.only.error`): no Python call per
  message. A message the broker refuses for good (too large for the topic, authorization,
  an unknown topic) goes to `<topic>.dlq.relay` with the reason, and the rest flows.
- A fatal producer error (fencing, an idempotence failure) raises ProducerFatal: the caller
  replaces the producer and publishes again from the last acknowledged position.

Exactly-once mode (a `transactional_id`): the records of a batch go in one Kafka transaction,
begun with the first of them and committed by `commit_transaction` together with the
position reached. Every record carries the header `outbox_kafka_txn`, the transaction's id,
which the position record of the same transaction carries too: a reader can tell the
records of a committed transaction from those of an aborted one that a broker let through.
A message then times out after `relay_transaction_timeout_ms` (a transaction cannot wait
longer); the batch is aborted and published again from the position. A transactional call
that has not returned some seconds after its own timeout (librdkafka can wait on a lost
coordinator for ever: confluentinc/librdkafka#5456) makes the producer fatal, so it is
replaced and its transaction aborted by the successor's take-over.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

import structlog
from confluent_kafka import KafkaError, KafkaException, Producer, TopicPartition

from outbox.envelope import OutboxRecord
from outbox.kafka import TopicManager, dlq_topic, producer_config
from outbox.settings import Settings
from outbox.wire_formats import Route, encode_record, record_field, route
from relays.metrics import PUBLISH_LATENCY
from relays.publish_spans import publish_trail

log = structlog.get_logger(__name__)

DLQ_SUFFIX = ".dlq.relay"
# Reports that say the message was withdrawn by this process (a stop), not refused.
_WITHDRAWN = {KafkaError._PURGE_QUEUE, KafkaError._PURGE_INFLIGHT}
# A broker error that says nothing about the message: retried with the batch (from the last
# acknowledged position), never dead-lettered. Tansu answers it to a produce that races the
# creation of its topic.
_SAYS_NOTHING = {KafkaError.UNKNOWN}
# The header naming the Kafka transaction a record belongs to (exactly-once mode).
TXN_HEADER = "outbox_kafka_txn"
# A broker connection lost: a request in flight then may be answered, after the broker's
# restart, as a duplicate it never stored (the local broker does; docs/operating/relays.md).
_CONNECTION_LOST = {KafkaError._TRANSPORT, KafkaError._ALL_BROKERS_DOWN}
# How long past its own timeout a transactional call may block before the producer is given
# up (the client's timeout is not always kept; see the module's docstring).
CALL_GRACE_S = 5.0


class PublishError(RuntimeError):
    """Some message of the batch was not acknowledged: the position must not move."""


class ProducerFatal(PublishError):
    """The producer cannot go on (fenced, or its idempotence state is broken)."""


class BatchPublisher:
    """Sends outbox records; `settle` returns only when all sent so far are acknowledged."""

    def __init__(
        self,
        settings: Settings,
        *,
        stop_requested: Callable[[], bool],
        observe_latency: Callable[[float], None] = PUBLISH_LATENCY.observe,
        on_dead_letter: Callable[[], None] = lambda: None,
        producer_factory: Callable[[dict[str, Any]], Producer] = Producer,
        transactional_id: str | None = None,
    ) -> None:
        self._settings = settings
        self._routes: dict[str, Route] = {}
        self.observe_latency = observe_latency
        # The relay's producer settings (no timeout, failures-only reports, its queue
        # bounds) are the `relay` role of outbox/kafka.py; only the callbacks are added here.
        config = producer_config(
            settings, "relay", on_delivery=self._on_failed_delivery, error_cb=self._on_error)
        if transactional_id is not None:
            # Transactions need idempotence, and no message may outlive its transaction. A
            # deployment that turned idempotence off keeps its one request in flight: half
            # the relay's CPU here, and no request of a batch waiting behind another.
            config.update({"transactional.id": transactional_id, "enable.idempotence": True,
                           "transaction.timeout.ms": settings.relay_transaction_timeout_ms,
                           "message.timeout.ms": settings.relay_transaction_timeout_ms})
        self._producer = producer_factory(config)
        self.transactional_id = transactional_id
        self.transactional = transactional_id is not None
        # High bits of this producer's own, so no two producers' transactions share an id;
        # a number, because the relay commits it as a group offset (relays/checkpointer.py).
        self._txn_base = secrets.randbits(31) << 32
        self._txn_count = 0
        self.txn_id: int | None = None  # the open transaction's
        self._txn_header: tuple[str, bytes] | None = None
        self._connection_lost_in_txn = False
        self._initialized = False
        self._topics = TopicManager(settings)
        self._stop_requested = stop_requested
        self._on_dead_letter = on_dead_letter
        self._refused: list[tuple[KafkaError, Any]] = []
        self._failed: list[str] = []
        self._fatal: str | None = None
        self._sent = 0
        self._acks_awaited_since: float | None = None
        self.progress_at = time.monotonic()  # the last thousand sent, or a wait for acks
        # None (nothing kept per message) unless tracing or DEBUG logging is on.
        self._trail = publish_trail()

    def _on_failed_delivery(self, err: KafkaError, msg: Any) -> None:
        if err.code() in _WITHDRAWN:
            return
        if err.fatal():
            self._fatal = str(err)
        elif ((msg.topic() or "").endswith(DLQ_SUFFIX) or err.retriable()
              or err.code() in _SAYS_NOTHING or self.transactional):
            # A transaction with a failed message can only be aborted (then published
            # again): its refused records cannot be dead-lettered inside it.
            self._failed.append(f"{msg.topic()}: {err}")
        else:
            self._refused.append((err, msg))

    def _on_error(self, err: KafkaError) -> None:
        if err.code() in _CONNECTION_LOST and self._txn_header is not None:
            self._connection_lost_in_txn = True
        if err.fatal():
            self._fatal = str(err)
            log.error("producer_fatal", error=str(err))
        else:  # connection trouble: librdkafka retries on its own
            log.warning("producer_error", error=str(err))

    def route(self, aggregate_type: str) -> Route:
        """The topic (ensured) and wire format of `aggregate_type`'s events."""
        found = self._routes.get(aggregate_type)
        if found is None:
            found = self._routes[aggregate_type] = route(self._settings, aggregate_type)
            self._topics.ensure(found.topic)
        return found

    def send(self, rec: OutboxRecord) -> None:
        """Produce one record (key = aggregate id, in its aggregate type's wire format)
        without waiting for it."""
        rec_route = self.route(rec.aggregate_type)
        topic = rec_route.topic
        value, headers = encode_record(rec_route, rec)
        key = rec.aggregate_id.encode()
        try:
            self._produce(topic, key, value, headers)
            if self._trail is not None:
                self._trail.note(topic, key, headers)
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.MSG_SIZE_TOO_LARGE:
                raise
            # It can never be sent: park it where it is visible, and go on.
            self._dead_letter(topic, key, encode_record(rec_route, rec.without_payload())[0],
                              headers,
                              f"too large for the broker: {exc.args[0].str()}",
                              payload_omitted=True)
        self._sent += 1
        if self._sent % 1000 == 0:  # serve callbacks now and then, not per message
            self._producer.poll(0)
            self.progress_at = time.monotonic()

    def send_encoded(self, topic: str, key: bytes, value: bytes, headers: list[Any]) -> bool:
        """Produce an already encoded record (the streaming relay's path; `topic` must be
        a `route`'s). False when it is too large for the producer: the caller then hands
        it to `send`, which dead-letters it."""
        try:
            self._produce(topic, key, value, headers)
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.MSG_SIZE_TOO_LARGE:
                raise
            return False
        if self._trail is not None:
            self._trail.note(topic, key, headers)
        self._sent += 1
        if self._sent % 1000 == 0:
            self._producer.poll(0)
            self.progress_at = time.monotonic()
        return True

    def publish(self, records: Iterable[OutboxRecord], grace_s: float = 10.0) -> int:
        """Send every record and settle; return how many were sent."""
        count = 0
        for rec in records:
            self.send(rec)
            count += 1
        self.settle(grace_s)
        return count

    def settle(self, grace_s: float = 10.0) -> None:
        """Wait until every message sent so far is acknowledged, dead-lettering those the
        broker refused for good. Raises ProducerFatal, or PublishError when a stop was
        requested and the acknowledgements did not come within `grace_s`: the caller must
        then not move its position."""
        try:
            self._settle(grace_s)
        except Exception as exc:
            if self._trail is not None:
                self._trail.settled(error=f"{type(exc).__name__}: {exc}")
            raise
        if self._trail is not None:
            self._trail.settled()

    def _settle(self, grace_s: float) -> None:
        self._wait_for_acks(grace_s)
        while self._refused:
            refused, self._refused = self._refused, []
            for err, msg in refused:
                self._dead_letter(msg.topic(), msg.key(), msg.value(), msg.headers() or [],
                                  f"refused by the broker: {err.str()}")
            self._wait_for_acks(grace_s)
        if self._failed:
            failed, self._failed = self._failed, []
            raise PublishError(f"{len(failed)} messages failed, first: {failed[0]}")
        self._sent = 0

    def _produce(self, topic: str, key: bytes, value: bytes, headers: list[Any]) -> None:
        if self.transactional:
            if self._txn_header is None:
                self._begin_transaction()
            headers = [*headers, self._txn_header]
        while True:
            try:
                self._producer.produce(topic, value, key, headers=headers)
                return
            except BufferError:  # local queue full: bounded memory, wait for acks
                self._producer.poll(0.05)
                self._raise_if_fatal()

    def init_transactions(self) -> None:
        """Take over the transactional id: any transaction a previous holder left open is
        aborted, and that holder is fenced (its commits fail from now on). Once per
        producer: the client refuses a second time."""
        if self._initialized:
            return
        self._transaction_call(self._producer.init_transactions,
                               timeout_s=self._settings.relay_transaction_timeout_ms / 1000)
        self._initialized = True

    def ensure_transaction(self) -> int:
        """The open transaction's id, begun now if none is open (a position with no
        records)."""
        if self._txn_header is None:
            self._begin_transaction()
        assert self.txn_id is not None
        return self.txn_id

    def _begin_transaction(self) -> None:
        self._transaction_call(self._producer.begin_transaction)
        self._txn_count += 1
        self._connection_lost_in_txn = False
        self.txn_id = self._txn_base | self._txn_count
        self._txn_header = (TXN_HEADER, str(self.txn_id).encode())

    def commit_transaction(self, position_topic: str, key: bytes, position: bytes,
                           offsets: list[TopicPartition], group_metadata: Any,
                           grace_s: float = 10.0) -> None:
        """Settle the open transaction, add the position record and the group offsets that
        hold the position, and commit: all of it becomes visible, or none. On a failure the
        transaction is aborted and PublishError (ProducerFatal when fenced) raised."""
        assert self.txn_id is not None, "no transaction is open"
        timeout = self._settings.relay_transaction_timeout_ms / 1000
        try:
            self._produce(position_topic, key, position, [])
            self.settle(grace_s)
            if self._connection_lost_in_txn:
                # Its records were all acknowledged, but one acknowledgement may be a
                # broker's duplicate answer for a request it lost: publish them again.
                raise PublishError("a broker connection was lost during the transaction")
            self._transaction_call(self._producer.send_offsets_to_transaction, offsets,
                                   group_metadata, timeout_s=timeout)
            self._transaction_call(self._producer.commit_transaction, timeout_s=timeout)
        except ProducerFatal:
            raise
        except KafkaException as exc:  # a produce refused: the producer's state is broken
            if exc.args[0].fatal():
                self._fatal = str(exc.args[0])
                raise ProducerFatal(f"the producer cannot go on: {exc.args[0]}") from exc
            self.abort_transaction()
            raise PublishError(f"the position could not be produced: {exc}") from exc
        except PublishError:
            self.abort_transaction()
            raise
        self.txn_id = self._txn_header = None
        self._sent = 0

    def abort_transaction(self) -> None:
        """Abort the open transaction, if any (its records are withdrawn)."""
        if self._txn_header is None:
            return
        self._refused.clear()
        self._failed.clear()
        try:
            self._transaction_call(self._producer.abort_transaction,
                                   timeout_s=self._settings.relay_transaction_timeout_ms / 1000)
        except PublishError as exc:  # a producer that cannot abort cannot go on either
            raise ProducerFatal(f"the transaction could not be aborted: {exc}") from exc
        self.txn_id = self._txn_header = None
        self._sent = 0

    def _transaction_call(self, call: Callable[..., Any], *args: Any,
                          timeout_s: float | None = None) -> Any:
        """A transactional API call (given `timeout_s` as its last argument when set); a
        Kafka error becomes ProducerFatal (fenced, or the producer is broken) or PublishError
        (the transaction must be aborted or retried)."""
        try:
            if timeout_s is None:
                return call(*args)
            return self._call_within(call, (*args, timeout_s), timeout_s + CALL_GRACE_S)
        except KafkaException as exc:
            err = exc.args[0]
            if err.fatal():
                self._fatal = str(err)
                raise ProducerFatal(f"the producer cannot go on: {err}") from exc
            raise PublishError(f"{call.__name__}: {err}") from exc

    def _call_within(self, call: Callable[..., Any], args: tuple[Any, ...],
                     limit_s: float) -> Any:
        """`call(*args)` on a thread of its own, given up (the producer made fatal) when it
        has not returned within `limit_s`: a blocked C call cannot be interrupted, so the
        thread is left to end whenever the client lets it, holding the old producer."""
        outcome: dict[str, Any] = {}

        def run() -> None:
            try:
                outcome["value"] = call(*args)
            except BaseException as exc:  # handed to the caller's thread as it is
                outcome["error"] = exc

        worker = threading.Thread(target=run, name=f"kafka-{call.__name__}", daemon=True)
        worker.start()
        worker.join(limit_s)
        if worker.is_alive():
            self._fatal = f"{call.__name__} did not return within {limit_s:.0f} s"
            raise ProducerFatal(f"the producer cannot go on: {self._fatal}")
        if "error" in outcome:
            raise outcome["error"]
        return outcome.get("value")

    def _dead_letter(self, topic: str, key: bytes, value: bytes, headers: list[Any],
                     reason: str, payload_omitted: bool = False) -> None:
        dead = dlq_topic(topic, "relay")
        self._topics.ensure(dead)
        own = [("reason", reason.encode()), ("source_topic", topic.encode())]
        if payload_omitted:
            own.append(("payload_omitted", b"true"))
        self._produce(dead, key, value, own + [h for h in headers if h[0] not in
                                               {"reason", "source_topic"}])
        self._on_dead_letter()
        log.error("row_dead_lettered", topic=dead, id=record_field(headers, value, "id"),
                  reason=reason)

    def _flush(self, timeout_s: float) -> int:
        """`flush`, whose errors say whether the producer can go on. A fenced transactional
        producer raises from inside the client's callbacks (as a SystemError whose cause is
        the KafkaException)."""
        try:
            return self._producer.flush(timeout_s)
        except (KafkaException, SystemError) as exc:
            cause = exc if isinstance(exc, KafkaException) else (exc.__cause__
                                                                 or exc.__context__)
            if isinstance(cause, KafkaException) and cause.args[0].fatal():
                self._fatal = str(cause.args[0])
            self._raise_if_fatal()
            raise PublishError(f"waiting for acknowledgements: {exc}") from exc

    def _raise_if_transaction_stuck(self) -> None:
        """A transaction with a failed message sends nothing more until it is aborted (so
        its queue never drains), and one waiting longer than its timeout cannot commit:
        either way, give it up now, to be aborted and published again."""
        waited = time.monotonic() - (self._acks_awaited_since or time.monotonic())
        if self._failed or waited * 1000 > self._settings.relay_transaction_timeout_ms:
            failed, self._failed = self._failed, []
            raise PublishError(f"the transaction cannot complete ({len(self._producer)} "
                               f"messages unacknowledged after {waited:.0f} s"
                               + (f"; first failure: {failed[0]})" if failed else ")"))

    def _raise_if_fatal(self) -> None:
        if self._fatal is not None:
            raise ProducerFatal(f"the producer cannot go on: {self._fatal}")

    def _wait_for_acks(self, grace_s: float) -> None:
        stop_deadline: float | None = None
        self._acks_awaited_since = time.monotonic()
        try:
            while self._flush(0.5) > 0:
                self.progress_at = time.monotonic()
                self._raise_if_fatal()
                if self.transactional:
                    self._raise_if_transaction_stuck()
                if self._stop_requested():
                    stop_deadline = stop_deadline or time.monotonic() + grace_s
                    if time.monotonic() > stop_deadline:
                        raise PublishError(f"stopping with {len(self._producer)} messages "
                                           "unacknowledged")
            self._raise_if_fatal()
        finally:
            self._acks_awaited_since = None

    def seconds_awaiting_acks(self) -> float:
        """How long the batch in hand has waited for the broker (0 when none waits): the
        producer retries for as long as an outage lasts, so it shows here."""
        since = self._acks_awaited_since
        return 0.0 if since is None else time.monotonic() - since

    def close(self, timeout_s: float = 5.0) -> None:
        """Deliver what is left within `timeout_s`, withdraw the rest, release the producer
        (the position was never moved past what is withdrawn)."""
        if self._trail is not None:
            self._trail.discard()
        if self._txn_header is not None and self._fatal is None:
            try:
                self._producer.abort_transaction(timeout_s)
            except KafkaException as exc:  # the next holder's init_transactions aborts it
                log.warning("transaction_not_aborted", txn=self.txn_id, error=str(exc))
        if self._fatal is None:
            self._producer.flush(timeout_s)
        self._producer.purge()
        self._producer.flush(0)
        # The producer holds this object's callbacks: dropping it breaks the cycle, so its
        # threads end now rather than at the next garbage collection.
        self._producer = None  # type: ignore[assignment]
