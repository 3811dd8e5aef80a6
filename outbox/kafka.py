"""Kafka configuration and naming shared by every client of the sidecar.

Every producer, consumer and admin client of the project is built here (`make_producer`,
`make_consumer`, `make_reader`, `make_admin`, or their `*_config` dicts): the bootstrap servers
and the security settings (TLS, SASL), then the role's own settings, then the caller's, and
last the pass-through properties (`OUTBOX_KAFKA_PROPERTIES__*`), so an operator can override
anything.

Topics are `<prefix>.<aggregate_type>`; dead letters of a consumer (a projector, or `relay`)
go to `<topic>.dlq.<consumer>`. Producers use `acks=all` and are idempotent unless
`OUTBOX_KAFKA_IDEMPOTENCE=false`; consumers commit by hand, after their effects.

Retention: the log keeps every event. The views are rebuilt by replaying the topics from
offset 0, so an event the broker deleted would be missing from every rebuilt view; topics are
created with `retention.ms=-1` (`OUTBOX_TOPIC_RETENTION_MS`) and `cleanup.policy=delete`,
which with an infinite retention deletes nothing. Compaction keyed by aggregate id was
considered: the events carry their aggregate's full current document (event-carried state),
so the latest event of each aggregate would rebuild the same views, and the log would stay
bounded by the number of aggregates. It was not chosen: a compacted topic loses the per-event
history that tracing reads (every state change of an aggregate and where it sits in Kafka),
and Tansu 0.6.0, the local broker, does not compact (its S3 and memory storage engines
ignore `cleanup.policy` and `retention.ms`). The price is a log that grows with every event;
`outbox topics` shows what each topic keeps.
"""

from __future__ import annotations

from typing import Any, Literal

import structlog
from confluent_kafka import Consumer, KafkaError, KafkaException, Producer
from confluent_kafka.admin import AdminClient, NewTopic

from outbox.settings import Settings

log = structlog.get_logger(__name__)


def topic_name(prefix: str, aggregate_type: str) -> str:
    """The topic of an aggregate type: `<prefix>.<aggregate_type>`."""
    return f"{prefix}.{aggregate_type}"


def dlq_topic(topic: str, consumer: str) -> str:
    """The dead-letter topic of `consumer` (a projector, or `relay`) for `topic`."""
    return f"{topic}.dlq.{consumer}"


ProducerRole = Literal["default", "relay"]

# What each kind of producer needs beyond the shared producer settings, in one place.
PRODUCER_ROLES: dict[str, dict[str, Any]] = {
    # Dead-letter writers, the dead-letter replay and the benchmark's raw producer: a message
    # not acknowledged within a minute is reported to the caller as failed.
    "default": {
        "message.timeout.ms": 60000,
        "queue.buffering.max.messages": 200000,
        "queue.buffering.max.kbytes": 262144,
    },
    # The relay (relays/publisher.py): no message ever times out (librdkafka keeps it queued
    # and retries it in order through an outage of any length, so per-aggregate order holds),
    # only failures are reported (no Python call per message), and the queue is bounded
    # lower: through an outage it holds what was read from the database and not yet
    # acknowledged, and a full queue makes the relay wait instead of reading more.
    "relay": {
        "message.timeout.ms": 0,
        "delivery.report.only.error": True,
        "queue.buffering.max.messages": 100_000,
        "queue.buffering.max.kbytes": 65_536,
    },
}


def client_config(settings: Settings) -> dict[str, Any]:
    """What every client shares: the bootstrap servers and the security settings (TLS, SASL;
    see outbox/kafka_settings.py)."""
    return {"bootstrap.servers": settings.kafka_bootstrap, **settings.kafka_security_config()}


def _finish(settings: Settings, config: dict[str, Any]) -> dict[str, Any]:
    """`config` with the pass-through properties over it: the operator has the last word."""
    return {**config, **settings.kafka_passthrough_config()}


def producer_config(settings: Settings, role: ProducerRole = "default",
                    **overrides: Any) -> dict[str, Any]:
    """Producer settings: the shared ones, then the `role`'s (PRODUCER_ROLES), then the
    caller's `overrides` (callbacks), then the pass-through properties."""
    idempotent = settings.kafka_idempotence
    return _finish(settings, {
        **client_config(settings),
        "enable.idempotence": idempotent,
        # Without idempotence, a retried request behind another one in flight would land
        # after it: one at a time keeps each partition in order.
        **({} if idempotent else {"max.in.flight.requests.per.connection": 1}),
        "acks": "all",
        # Back within a second of a broker's return (the default backs off up to 10 s).
        "reconnect.backoff.max.ms": 1000,
        "linger.ms": 5,
        "batch.num.messages": 10000,
        # murmur2 partitions like the Java clients: the same key lands in the same partition
        # whichever client produces it.
        "partitioner": "murmur2_random",
        **PRODUCER_ROLES[role],
        **overrides,
    })


def consumer_config(settings: Settings, group_id: str, session_timeout_ms: int,
                    **overrides: Any) -> dict[str, Any]:
    """Consumer settings of a consumer group that commits by hand, after its effects."""
    return _finish(settings, {
        **client_config(settings),
        "group.id": group_id,
        "enable.auto.commit": False,
        "auto.offset.reset": "earliest",
        "session.timeout.ms": session_timeout_ms,
        "heartbeat.interval.ms": max(500, session_timeout_ms // 5),
        "partition.assignment.strategy": "range",
        # Only records of committed transactions (the exactly-once relay's): librdkafka's
        # default too, said here because the projectors' exactly-once reading depends on it.
        "isolation.level": "read_committed",
        **overrides,
    })


def reader_config(settings: Settings, group_id: str, **overrides: Any) -> dict[str, Any]:
    """Settings of a consumer that reads assigned partitions (or metadata, watermarks and a
    group's committed offsets) and commits nothing; `group_id` names it to the broker (the
    client requires one) or is the group whose offsets it reads."""
    return _finish(settings, {**client_config(settings), "group.id": group_id,
                              "enable.auto.commit": False,
                              "isolation.level": "read_committed", **overrides})


def admin_config(settings: Settings, **overrides: Any) -> dict[str, Any]:
    """Settings of an admin client (topics, configs, consumer groups)."""
    return _finish(settings, {**client_config(settings), **overrides})


def make_producer(settings: Settings, role: ProducerRole = "default",
                  **overrides: Any) -> Producer:
    """A producer built from `producer_config`."""
    return Producer(producer_config(settings, role, **overrides))


def make_consumer(settings: Settings, group_id: str, session_timeout_ms: int,
                  **overrides: Any) -> Consumer:
    """A consumer group member built from `consumer_config`."""
    return Consumer(consumer_config(settings, group_id, session_timeout_ms, **overrides))


def make_reader(settings: Settings, group_id: str, **overrides: Any) -> Consumer:
    """A consumer that commits nothing, built from `reader_config`."""
    return Consumer(reader_config(settings, group_id, **overrides))


def make_admin(settings: Settings, **overrides: Any) -> AdminClient:
    """An admin client built from `admin_config`."""
    return AdminClient(admin_config(settings, **overrides))


def replication(settings: Settings, brokers: int) -> tuple[int, int]:
    """The replication factor and min.insync.replicas of a new topic: the configured values, or
    min(3, `brokers`) and min(2, replication factor): an acknowledged write (acks=all) is on
    two brokers, and writes go on while one is down; a single-broker cluster still works."""
    factor = settings.topic_replication_factor or min(3, brokers)
    return factor, settings.topic_min_insync_replicas or min(2, factor)


def topic_config(settings: Settings, min_insync: int) -> dict[str, str]:
    """The configuration a new topic is created with (see the module docstring)."""
    return {
        "retention.ms": str(settings.topic_retention_ms),
        "min.insync.replicas": str(min_insync),
        "cleanup.policy": "delete",
    }


class TopicManager:
    """Creates topics with the configured partitions, replication and retention, once per
    process and topic. An existing topic is left as it is."""

    def __init__(self, settings: Settings) -> None:
        self._admin = make_admin(settings)
        self._settings = settings
        self._known: set[str] = set()
        # Cleared when the broker refuses the topic configs: later topics go without them.
        self._send_config = True

    def ensure(self, topic: str) -> None:
        """Create the topic unless seen before (an existing topic is fine)."""
        if topic in self._known:
            return
        metadata = self._admin.list_topics(timeout=10)
        if topic not in metadata.topics:
            factor, min_insync = replication(self._settings, len(metadata.brokers))
            partitions = self._settings.topic_partitions
            if self._send_config:
                config = topic_config(self._settings, min_insync)
                try:
                    self._create(NewTopic(topic, partitions, factor, config=config))
                except KafkaException as exc:
                    # A broker refusing the configs must not stop the pipeline; the warning
                    # (once) and `outbox topics` (exit 1) say the log may not keep everything.
                    if exc.args[0].code() != KafkaError.INVALID_CONFIG:
                        raise
                    self._send_config = False
                    log.warning("topic_config_refused", topic=topic, config=config,
                                error=exc.args[0].str(),
                                consequence="topics are created with the broker's defaults")
            if not self._send_config:
                self._create(NewTopic(topic, partitions, factor))
        self._known.add(topic)

    def _create(self, new: NewTopic) -> None:
        """Create one topic; one created meanwhile by another process is fine."""
        try:
            self._admin.create_topics([new])[new.topic].result(timeout=30)
            log.info("topic_created", topic=new.topic, partitions=new.num_partitions,
                     replication_factor=new.replication_factor, config=new.config)
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise
