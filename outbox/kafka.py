"""Kafka configuration and naming shared by every client of the sidecar.

Topics are `<prefix>.<aggregate_type>`; dead letters of a consumer (a projector, or `relay`)
go to `<topic>.dlq.<consumer>`. Producers are idempotent with `acks=all`; consumers commit
by hand, after their effects.
"""

from __future__ import annotations

from typing import Any

import structlog
from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient, NewTopic

from outbox.settings import Settings

log = structlog.get_logger(__name__)


def topic_name(prefix: str, aggregate_type: str) -> str:
    """The topic of an aggregate type: `<prefix>.<aggregate_type>`."""
    return f"{prefix}.{aggregate_type}"


def dlq_topic(topic: str, consumer: str) -> str:
    """The dead-letter topic of `consumer` (a projector, or `relay`) for `topic`."""
    return f"{topic}.dlq.{consumer}"


def producer_config(settings: Settings, **overrides: Any) -> dict[str, Any]:
    """Producer settings shared by the relays, the dead-letter writers and the benchmark."""
    return {
        "bootstrap.servers": settings.kafka_bootstrap,
        "enable.idempotence": True,
        "acks": "all",
        "linger.ms": 5,
        "batch.num.messages": 10000,
        "queue.buffering.max.messages": 200000,
        "queue.buffering.max.kbytes": 262144,
        "message.timeout.ms": 60000,
        # murmur2 partitions like the Java clients: the same key lands in the same partition
        # whichever client produces it.
        "partitioner": "murmur2_random",
        **overrides,
    }


def consumer_config(settings: Settings, group_id: str, session_timeout_ms: int,
                    **overrides: Any) -> dict[str, Any]:
    """Consumer settings of a consumer group that commits by hand, after its effects."""
    return {
        "bootstrap.servers": settings.kafka_bootstrap,
        "group.id": group_id,
        "enable.auto.commit": False,
        "auto.offset.reset": "earliest",
        "session.timeout.ms": session_timeout_ms,
        "heartbeat.interval.ms": max(500, session_timeout_ms // 5),
        "partition.assignment.strategy": "range",
        **overrides,
    }


class TopicManager:
    """Creates topics with the configured partition count, once per process and topic."""

    def __init__(self, settings: Settings) -> None:
        self._admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap})
        self._partitions = settings.topic_partitions
        self._known: set[str] = set()

    def ensure(self, topic: str) -> None:
        """Create the topic unless seen before (an existing topic is fine)."""
        if topic in self._known:
            return
        if topic not in self._admin.list_topics(timeout=10).topics:
            future = self._admin.create_topics([NewTopic(topic, self._partitions, 1)])[topic]
            try:
                future.result(timeout=30)
                log.info("topic_created", topic=topic, partitions=self._partitions)
            except KafkaException as exc:
                if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                    raise
        self._known.add(topic)
