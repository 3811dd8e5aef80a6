"""The consumer runtime against the real broker: retries with paused partitions, dead
letters for messages that keep failing, commits only of what was applied."""

from __future__ import annotations

import threading
import uuid
from datetime import UTC, datetime

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from kafka import KafkaConsumer

from outbox.envelope import EventEnvelope
from projectors.runtime import ConsumerRuntime, dlq_topic
from relays.publisher import TopicManager
from tests.pipeline_harness import wait_for

pytestmark = pytest.mark.slow


class FaultInjectingProjector:
    """A projector whose sink fails on purpose: `fail_times` batch failures (a transient
    outage), and always on the events named in `poison` (a fault no real sink can be made
    to produce on demand for one chosen message)."""

    name = "faulty"
    aggregate_types = ("thing",)

    def __init__(self, fail_times: int = 0, poison: frozenset[str] = frozenset()) -> None:
        self.fail_times = fail_times
        self.poison = poison
        self.applied: list[str] = []
        self.calls = 0

    def apply(self, events: list[EventEnvelope]) -> None:
        self.calls += 1
        if self.fail_times > 0:
            self.fail_times -= 1
            raise ConnectionError("sink unavailable")
        if any(e.aggregate_id in self.poison for e in events):
            raise ValueError("sink refuses this document")
        self.applied += [e.aggregate_id for e in events]

    def close(self) -> None:
        return None


def _event(agg: str) -> bytes:
    return EventEnvelope(id=uuid.uuid4(), type="thing.changed", aggregate_type="thing",
                         aggregate_id=agg, aggregate_version=1,
                         occurred_at=datetime.now(UTC), payload={}).to_json()


@pytest.fixture
def runtime_settings(settings):
    return settings.model_copy(update={"projector_session_timeout_ms": 6000,
                                       "projector_max_retries": 3})


def _run(settings, projector, produce: list[str]):
    topic = f"{settings.topic_prefix}.thing"
    TopicManager(settings).ensure(topic)
    p = Producer({"bootstrap.servers": settings.kafka_bootstrap})
    for agg in produce:
        p.produce(topic, key=agg.encode(), value=_event(agg))
    assert p.flush(10) == 0
    rt = ConsumerRuntime(settings, projector)
    t = threading.Thread(target=rt.run, daemon=True)
    t.start()
    return rt, t, topic


def _committed(settings, group: str, topic: str) -> int:
    c = Consumer({"bootstrap.servers": settings.kafka_bootstrap, "group.id": group})
    parts = c.list_topics(topic, timeout=10).topics[topic].partitions
    got = c.committed([TopicPartition(topic, p) for p in parts], timeout=10)
    c.close()
    return sum(max(tp.offset, 0) for tp in got)


def test_transient_failures_are_retried_then_applied_and_committed(runtime_settings):
    projector = FaultInjectingProjector(fail_times=2)
    names = [f"a{i}" for i in range(10)]
    rt, t, topic = _run(runtime_settings, projector, names)
    wait_for(lambda: sorted(projector.applied) == sorted(names), timeout_s=60, what="applied")
    wait_for(lambda: _committed(runtime_settings, rt.group_id, topic) == 10, timeout_s=30,
             what="offsets committed")
    rt.stop.set()
    t.join(30)
    assert projector.calls >= 3


def test_a_message_that_keeps_failing_is_dead_lettered_and_the_rest_applied(runtime_settings):
    projector = FaultInjectingProjector(poison=frozenset({"bad"}))
    names = ["g1", "bad", "g2", "g3"]
    rt, t, topic = _run(runtime_settings, projector, names)
    wait_for(lambda: sorted(projector.applied) == ["g1", "g2", "g3"], timeout_s=60,
             what="good ones applied")
    wait_for(lambda: _committed(runtime_settings, rt.group_id, topic) == 4, timeout_s=30,
             what="offsets committed")
    rt.stop.set()
    t.join(30)
    dlq = KafkaConsumer(dlq_topic(topic, "faulty"), bootstrap_servers=runtime_settings
                        .kafka_bootstrap, auto_offset_reset="earliest", consumer_timeout_ms=5000)
    got = [(m.key, dict(m.headers)) for m in dlq]
    dlq.close()
    assert [k for k, _ in got] == [b"bad"]
    assert got[0][1]["reason"].startswith(b"apply failed: sink refuses this document")
