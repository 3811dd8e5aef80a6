"""What the broker keeps of the sidecar's topics (`outbox topics`).

A view is rebuilt by replaying its topic from offset 0, which yields every event only while
the broker still holds them all: each partition's earliest offset (low watermark) is 0, and
retention is infinite so that it stays 0. Only low watermarks are read: Tansu 0.6.0 reports
the high watermark unreliably (see docs/operating/status.md), so no lag is computed from it.
"""

from __future__ import annotations

from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient, ConfigResource, ResourceType

from outbox.kafka import make_admin, make_reader
from outbox.settings import Settings
from outbox.wire_formats import is_event_topic

UNKNOWN = "unknown"
COMPLETE = "complete"
INFINITE_RETENTION = "-1"


class KafkaUnreachable(Exception):
    """The cluster metadata could not be read: Kafka is down or the bootstrap address wrong."""


def describe_topics(settings: Settings, timeout_s: float = 5.0) -> list[dict[str, Any]]:
    """Every event topic (`<prefix>.*`, and the debezium format's topics when an aggregate
    type uses it; dead-letter topics included), sorted by name.

    Each entry: `name`, `partitions`, `replication_factor`, `min_insync_replicas`,
    `retention_ms`, `cleanup_policy` (the configs as strings as the broker reports them,
    "unknown" when it does not), `low_watermarks` (per partition, None when unreadable) and
    `replay_coverage` (see `replay_coverage`). Raises `KafkaUnreachable` when the cluster
    metadata cannot be read within `timeout_s`.
    """
    # log_level 0: librdkafka would print a line per failed connection attempt; an
    # unreachable broker is reported once, by the exception, with the connection's own
    # error (a refused TLS certificate or SASL login says so there, not in the exception).
    errors: list[KafkaError] = []
    admin = make_admin(settings, log_level=0, error_cb=errors.append)
    try:
        metadata = admin.list_topics(timeout=timeout_s)
    except KafkaException as exc:
        admin.poll(0)  # serves the error callback
        reason = "; ".join(dict.fromkeys(e.str() for e in errors)) or exc.args[0].str()
        raise KafkaUnreachable(
            f"Kafka at {settings.kafka_bootstrap} cannot be reached: {reason}") from exc
    names = sorted(t for t in metadata.topics if is_event_topic(settings, t))
    configs = _describe_configs(admin, names, timeout_s)
    # Reading watermarks joins no group, but the client insists on a group id.
    consumer = make_reader(settings, f"{settings.topic_prefix}.topics", log_level=0)
    try:
        topics = []
        for name in names:
            partitions = metadata.topics[name].partitions
            lows = [_low_watermark(consumer, name, p, timeout_s) for p in sorted(partitions)]
            config = configs.get(name, {})
            topics.append({
                "name": name,
                "partitions": len(partitions),
                # The weakest partition is what the topic can promise.
                "replication_factor": min((len(p.replicas) for p in partitions.values()),
                                          default=0),
                "min_insync_replicas": config.get("min.insync.replicas", UNKNOWN),
                "retention_ms": config.get("retention.ms", UNKNOWN),
                "cleanup_policy": config.get("cleanup.policy", UNKNOWN),
                "low_watermarks": lows,
                "replay_coverage": replay_coverage(lows),
            })
    finally:
        consumer.close()
    return topics


def replay_coverage(low_watermarks: list[int | None]) -> str:
    """What a replay from the start gets, given each partition's low watermark (index =
    partition): "complete" when all are 0, "unknown" when one could not be read, otherwise
    where each truncated partition begins."""
    if any(low is None for low in low_watermarks):
        return UNKNOWN
    truncated = [f"partition {p} from offset {low}"
                 for p, low in enumerate(low_watermarks) if low]
    if not truncated:
        return COMPLETE
    return f"{', '.join(truncated)} (older events deleted)"


def replay_safe(topic: dict[str, Any]) -> bool:
    """True when a replay of the topic gets every event, now and later: nothing deleted yet,
    and an infinite retention as the broker reports it."""
    return (topic["replay_coverage"] == COMPLETE
            and topic["retention_ms"] == INFINITE_RETENTION)


def _describe_configs(admin: AdminClient, names: list[str],
                      timeout_s: float) -> dict[str, dict[str, str]]:
    """The configs the broker reports per topic; a topic it cannot describe is left out, so
    its values read "unknown"."""
    if not names:
        return {}
    futures = admin.describe_configs([ConfigResource(ResourceType.TOPIC, n) for n in names],
                                     request_timeout=timeout_s)
    configs = {}
    for resource, future in futures.items():
        try:
            entries = future.result(timeout=timeout_s)
        except (KafkaException, TimeoutError):
            continue
        configs[resource.name] = {k: e.value for k, e in entries.items() if e.value is not None}
    return configs


def _low_watermark(consumer: Consumer, topic: str, partition: int,
                   timeout_s: float) -> int | None:
    """The partition's earliest offset, or None when the broker did not answer."""
    try:
        offsets = consumer.get_watermark_offsets(TopicPartition(topic, partition),
                                                 timeout=timeout_s)
    except KafkaException:
        return None
    return None if offsets is None else offsets[0]
