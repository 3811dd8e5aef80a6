"""Topics as `TopicManager` creates them (partitions, replication, retention) and the
`outbox topics` report, against the stack's broker."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import Future

import pytest
import structlog
from confluent_kafka import KafkaError, KafkaException, Producer
from confluent_kafka.admin import AdminClient, NewTopic

from outbox.kafka import TopicManager, dlq_topic, producer_config, replication, topic_name
from outbox.topics import describe_topics, replay_coverage
from outbox_app.settings import AppSettings


@pytest.fixture
def admin(settings: AppSettings) -> Iterator[AdminClient]:
    """An admin client; deletes this test's topics afterwards."""
    client = AdminClient({"bootstrap.servers": settings.kafka_bootstrap})
    yield client
    mine = [t for t in client.list_topics(timeout=10).topics
            if t.startswith(settings.topic_prefix + ".")]
    for future in (client.delete_topics(mine) if mine else {}).values():
        future.result(timeout=30)


def _cli_topics(settings: AppSettings, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "outbox.cli", "topics", "--json"],
        env={**os.environ, "OUTBOX_TOPIC_PREFIX": settings.topic_prefix, **env},
        capture_output=True, text=True, timeout=60,
    )


def test_created_topics_get_partitions_replication_and_retention(settings, admin):
    s = settings.model_copy(update={"topic_partitions": 2})
    image = topic_name(s.topic_prefix, "image")
    dead_letters = dlq_topic(image, "search")
    manager = TopicManager(s)
    for topic in (image, dead_letters, image):
        manager.ensure(topic)

    metadata = admin.list_topics(timeout=10)
    factor, min_insync = replication(s, len(metadata.brokers))
    assert (factor, min_insync) == (min(3, len(metadata.brokers)), min(2, factor))
    for topic in (image, dead_letters):
        partitions = metadata.topics[topic].partitions
        assert len(partitions) == 2
        assert all(len(p.replicas) == factor for p in partitions.values())

    described = {t["name"]: t for t in describe_topics(s)}
    assert set(described) == {image, dead_letters}
    for topic in described.values():
        assert topic["partitions"] == 2
        assert topic["replication_factor"] == factor
        assert topic["retention_ms"] == "-1"
        assert topic["cleanup_policy"] == "delete"
        assert topic["min_insync_replicas"] == str(min_insync)


def test_cli_reports_complete_replay_coverage(settings, admin):
    image = topic_name(settings.topic_prefix, "image")
    manager = TopicManager(settings)
    manager.ensure(image)
    manager.ensure(dlq_topic(image, "ocr"))
    producer = Producer(producer_config(settings))
    for i in range(20):
        producer.produce(image, key=f"agg-{i}", value=b"{}")
    assert producer.flush(30) == 0

    result = _cli_topics(settings)
    assert result.returncode == 0, result.stderr
    topics = json.loads(result.stdout)
    assert [t["name"] for t in topics] == [image, dlq_topic(image, "ocr")]
    for topic in topics:
        assert topic["replay_coverage"] == "complete"
        assert topic["low_watermarks"] == [0] * settings.topic_partitions
        assert topic["retention_ms"] == "-1"


def test_cli_exits_1_when_retention_is_finite(settings, admin):
    finite = settings.model_copy(update={"topic_retention_ms": 86_400_000})
    TopicManager(finite).ensure(topic_name(settings.topic_prefix, "image"))

    result = _cli_topics(settings)
    assert result.returncode == 1, result.stderr
    [topic] = json.loads(result.stdout)
    assert topic["retention_ms"] == "86400000"
    assert topic["replay_coverage"] == "complete"


def test_cli_exits_2_when_kafka_cannot_be_reached(settings):
    result = _cli_topics(settings, OUTBOX_KAFKA_BOOTSTRAP="127.0.0.1:9")
    assert result.returncode == 2
    assert "Kafka at 127.0.0.1:9 cannot be reached" in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


class ConfigRefusingAdminMock:
    """MOCK of a broker that refuses topic configs with INVALID_CONFIG, as Apache Kafka does
    for configs it does not accept. Tansu 0.6.0 accepts any config (unknown names too), so
    this fault cannot be produced with the real broker; everything else goes to it."""

    def __init__(self, real: AdminClient) -> None:
        self.real = real
        self.created: list[NewTopic] = []

    def list_topics(self, timeout: float):
        return self.real.list_topics(timeout=timeout)

    def create_topics(self, new_topics: list[NewTopic]) -> dict[str, Future]:
        [new] = new_topics
        self.created.append(new)
        if not new.config:
            return self.real.create_topics(new_topics)
        refused: Future = Future()
        refused.set_exception(KafkaException(KafkaError(KafkaError.INVALID_CONFIG)))
        return {new.topic: refused}


def test_refused_configs_fall_back_to_broker_defaults_with_one_warning(settings, admin,
                                                                       monkeypatch):
    logs = structlog.testing.CapturingLogger()
    monkeypatch.setattr("outbox.kafka.log", logs)
    manager = TopicManager(settings)
    mock = manager._admin = ConfigRefusingAdminMock(manager._admin)
    image = topic_name(settings.topic_prefix, "image")
    dead_letters = dlq_topic(image, "cache")
    manager.ensure(image)
    manager.ensure(dead_letters)

    # With configs once, then without: the second topic does not ask again.
    assert [(n.topic, bool(n.config)) for n in mock.created] == [
        (image, True), (image, False), (dead_letters, False)]
    warnings = [c for c in logs.calls if c.method_name == "warning"]
    assert [c.args for c in warnings] == [("topic_config_refused",)]
    metadata = admin.list_topics(timeout=10)
    assert all(len(metadata.topics[t].partitions) == settings.topic_partitions
               for t in (image, dead_letters))


def test_replay_coverage_names_truncated_partitions():
    # A low watermark above 0 cannot be produced on Tansu 0.6.0 (no retention enforcement,
    # DeleteRecords unimplemented), so the wording is checked on the function itself.
    assert replay_coverage([0, 0, 0]) == "complete"
    assert replay_coverage([0, 120, 7]) == (
        "partition 1 from offset 120, partition 2 from offset 7 (older events deleted)")
    assert replay_coverage([0, None]) == "unknown"
