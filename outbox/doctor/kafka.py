"""The doctor's Kafka checks: the cluster answers with the configured client settings, and
every event topic keeps its events forever with the replication new topics get."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient, ClusterMetadata

from outbox.doctor.findings import DoctorOptions, Finding, failed, passed, warned
from outbox.kafka import make_admin, replication
from outbox.settings import Settings, get_settings
from outbox.topics import COMPLETE, INFINITE_RETENTION, UNKNOWN, KafkaUnreachable, describe_topics
from outbox.wire_formats import event_topic

REACH_FIX = "OUTBOX_KAFKA_BOOTSTRAP and the OUTBOX_KAFKA_* security settings"


def admin_client(settings: Settings) -> AdminClient:
    """An admin client with the configured client settings (the one place the doctor builds
    a Kafka client)."""
    # log_level 0: an unreachable broker is reported once, by the check, not per attempt.
    return make_admin(settings, log_level=0)


def cluster_metadata(settings: Settings, timeout_s: float) -> ClusterMetadata | Finding:
    """The cluster's metadata, or the failed reachability check."""
    try:
        return admin_client(settings).list_topics(timeout=timeout_s)
    except KafkaException as exc:
        return failed("kafka.reachable", f"Kafka at {settings.kafka_bootstrap} does not answer "
                      f"within {timeout_s:g}s: {exc.args[0].str()}", REACH_FIX)


def kafka_checks(options: DoctorOptions, settings: Settings | None = None) -> list[Finding]:
    """Reachability, the topics of `options.aggregate_types`, and every event topic's
    retention and replication."""
    settings = settings or get_settings()
    metadata = cluster_metadata(settings, options.timeout_s)
    if isinstance(metadata, Finding):
        return [metadata]
    brokers = len(metadata.brokers)
    found = [passed("kafka.reachable", f"{brokers} broker(s) at {settings.kafka_bootstrap}")]
    found += topic_presence(settings, options.aggregate_types, metadata)
    try:
        topics = describe_topics(settings, options.timeout_s)
    except KafkaUnreachable as exc:
        return [*found, failed("kafka.topics", str(exc), REACH_FIX)]
    events = [t for t in topics if ".dlq." not in t["name"]]
    if not events:
        found.append(warned("kafka.topics", f"no event topics {settings.topic_prefix}.* yet",
                            "the relay creates each topic at its first event; to create them "
                            "now: `outbox topics --create <aggregate type>`"))
    wanted = replication(settings, brokers)
    found += [topic_finding(t, *wanted) for t in events]
    return found


def topic_presence(settings: Settings, aggregate_types: Iterable[str],
                   metadata: ClusterMetadata) -> list[Finding]:
    """Whether the event topic of each aggregate type exists."""
    found = []
    for aggregate_type in aggregate_types:
        topic = event_topic(settings, aggregate_type)
        if topic in metadata.topics:
            found.append(passed(f"kafka.topic_exists.{aggregate_type}", f"{topic} exists"))
        else:
            found.append(warned(
                f"kafka.topic_exists.{aggregate_type}", f"{topic} does not exist yet",
                f"`outbox topics --create {aggregate_type}` (the relay also creates it at the "
                "first event, if its Kafka user may create topics)"))
    return found


def topic_finding(topic: dict[str, Any], factor: int, min_insync: int) -> Finding:
    """One event topic as `outbox topics` describes it, against what a new topic gets: a
    finite retention fails (a replay would miss deleted events), weaker replication warns."""
    name = topic["name"]
    check = f"kafka.topic.{name}"
    retention = topic["retention_ms"]
    if retention not in (INFINITE_RETENTION, UNKNOWN):
        return failed(check, f"{name}: retention.ms = {retention}: the broker deletes older "
                      "events, and a view rebuilt from the log misses them",
                      f"kafka-configs --bootstrap-server <broker> --alter --entity-type topics "
                      f"--entity-name {name} --add-config retention.ms=-1")
    problems = []
    if retention == UNKNOWN:
        problems.append("the broker does not report retention.ms")
    if topic["replay_coverage"] != COMPLETE:
        problems.append(f"replay from offset 0 is {topic['replay_coverage']}")
    if topic["replication_factor"] < factor:
        problems.append(f"replication factor {topic['replication_factor']} < {factor}")
    isr = topic["min_insync_replicas"]
    if isr != UNKNOWN and int(isr) < min_insync:
        problems.append(f"min.insync.replicas {isr} < {min_insync}")
    if problems:
        return warned(check, f"{name}: {'; '.join(problems)}",
                      "check the topic with `outbox topics`; replication: kafka-reassign-"
                      "partitions, min.insync.replicas and retention.ms: kafka-configs "
                      "--alter; a log missing events: re-emit the current state of their "
                      "aggregates")
    return passed(check, f"{name}: retention infinite, replication factor "
                  f"{topic['replication_factor']}, min.insync.replicas {isr}")
