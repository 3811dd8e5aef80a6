"""The consumer runtime against the real broker: retries with paused partitions, dead
letters for messages that keep failing, commits only of what was applied."""

from __future__ import annotations

import threading
import time
import uuid
from datetime import UTC, datetime

import pytest
import redis
from confluent_kafka import Producer
from kafka import KafkaConsumer
from prometheus_client import REGISTRY

from outbox.envelope import EventEnvelope
from outbox.kafka import dlq_topic
from outbox_app.store_errors import is_outage
from projectors.runtime import ConsumerRuntime
from relays.publisher import TopicManager
from tests.own_redis import OwnRedis
from tests.pipeline_harness import committed_offsets, wait_for

pytestmark = pytest.mark.slow


class FaultInjectingProjector:
    """A projector whose sink fails on purpose, always, on the events named in `poison`
    (a fault no real sink can be made to produce on demand for one chosen message)."""

    name = "faulty"
    aggregate_types = ("thing",)

    def __init__(self, poison: frozenset[str]) -> None:
        self.poison = poison
        self.applied: list[str] = []

    def apply(self, events: list[EventEnvelope]) -> None:
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
    # Redis's errors are outages as the projectors writing to it declare them.
    rt = ConsumerRuntime(settings, projector, transient=is_outage)
    t = threading.Thread(target=rt.run, daemon=True)
    t.start()
    return rt, t, topic


class RedisSinkProjector:
    """A projector whose sink is a real Redis server: one key per event."""

    name = "redis-sink"
    aggregate_types = ("thing",)

    def __init__(self, port: int) -> None:
        self.client = redis.Redis(port=port, socket_timeout=2, socket_connect_timeout=1)
        self.calls = 0

    def apply(self, events: list[EventEnvelope]) -> None:
        self.calls += 1
        pipe = self.client.pipeline()
        for e in events:
            pipe.set(f"thing:{e.aggregate_id}", str(e.id))
        pipe.execute()

    def close(self) -> None:
        self.client.close()


@pytest.fixture
def own_redis():
    server = OwnRedis()
    yield server
    server.stop()


def _dead_letters(projector: str) -> float:
    return REGISTRY.get_sample_value("outbox_projector_dead_letters_total",
                                     {"projector": projector}) or 0.0


def test_sink_outage_is_waited_out_not_dead_lettered(runtime_settings, own_redis):
    # The sink is down before the first message arrives, and stays down for longer than
    # the bounded retries of a faulty message would last.
    projector = RedisSinkProjector(own_redis.port)
    dead_before = _dead_letters(projector.name)
    names = [f"a{i}" for i in range(10)]
    rt, t, topic = _run(runtime_settings, projector, names)
    wait_for(lambda: projector.calls > runtime_settings.projector_max_retries + 3,
             timeout_s=60, what="retries during the outage")
    assert committed_offsets(runtime_settings, rt.group_id, topic) == 0
    assert rt.health()["status"] == "sink_unavailable"
    own_redis.start()
    client = redis.Redis(port=own_redis.port)
    wait_for(lambda: client.exists(*[f"thing:{n}" for n in names]) == 10, timeout_s=60,
             what="applied after the outage")
    assert rt.health()["status"] == "ok"
    wait_for(lambda: committed_offsets(runtime_settings, rt.group_id, topic) == 10, timeout_s=30,
             what="offsets committed")
    rt.stop.set()
    t.join(30)
    assert _dead_letters(projector.name) == dead_before


def test_stop_during_an_outage_hands_the_batch_back(runtime_settings, own_redis):
    projector = RedisSinkProjector(own_redis.port)
    names = [f"b{i}" for i in range(5)]
    rt, t, topic = _run(runtime_settings, projector, names)
    wait_for(lambda: projector.calls >= 2, timeout_s=60, what="retries during the outage")
    rt.stop.set()
    t.join(30)
    assert not t.is_alive()
    assert committed_offsets(runtime_settings, rt.group_id, topic) == 0
    own_redis.start()
    again = RedisSinkProjector(own_redis.port)
    rt2 = ConsumerRuntime(runtime_settings, again, transient=is_outage)
    t2 = threading.Thread(target=rt2.run, daemon=True)
    t2.start()
    client = redis.Redis(port=own_redis.port)
    wait_for(lambda: client.exists(*[f"thing:{n}" for n in names]) == 5, timeout_s=60,
             what="applied by the next owner")
    wait_for(lambda: committed_offsets(runtime_settings, rt.group_id, topic) == 5, timeout_s=30,
             what="offsets committed")
    rt2.stop.set()
    t2.join(30)


def test_a_message_that_keeps_failing_is_dead_lettered_and_the_rest_applied(runtime_settings):
    projector = FaultInjectingProjector(poison=frozenset({"bad"}))
    names = ["g1", "bad", "g2", "g3"]
    rt, t, topic = _run(runtime_settings, projector, names)
    wait_for(lambda: sorted(projector.applied) == ["g1", "g2", "g3"], timeout_s=60,
             what="good ones applied")
    wait_for(lambda: committed_offsets(runtime_settings, rt.group_id, topic) == 4, timeout_s=30,
             what="offsets committed")
    rt.stop.set()
    t.join(30)
    dlq = KafkaConsumer(dlq_topic(topic, "faulty"), bootstrap_servers=runtime_settings
                        .kafka_bootstrap, auto_offset_reset="earliest", consumer_timeout_ms=5000)
    got = [(m.key, dict(m.headers)) for m in dlq]
    dlq.close()
    assert [k for k, _ in got] == [b"bad"]
    assert got[0][1]["reason"].startswith(b"apply failed: sink refuses this document")


class SlowProjector:
    """A projector whose first batch takes longer than the consumer's max.poll.interval.ms
    (as a batch of many OCR images can); it records every event it applies."""

    name = "slow"
    aggregate_types = ("thing",)

    def __init__(self, first_batch_s: float) -> None:
        self.first_batch_s = first_batch_s
        self.applied: list[str] = []

    def apply(self, events: list[EventEnvelope]) -> None:
        if not self.applied:
            threading.Event().wait(self.first_batch_s)
        self.applied += [e.aggregate_id for e in events]

    def close(self) -> None:
        return None


def test_a_batch_longer_than_the_poll_interval_keeps_the_partitions(runtime_settings):
    settings = runtime_settings.model_copy(update={"projector_max_poll_interval_ms": 7000})
    projector = SlowProjector(first_batch_s=12)
    names = [f"s{i}" for i in range(5)]
    rt, t, topic = _run(settings, projector, names)
    try:
        wait_for(lambda: committed_offsets(settings, rt.group_id, topic) == 5, timeout_s=60,
                 what="offsets committed")
        time.sleep(3)  # a redelivery after an eviction would show by now
        assert sorted(projector.applied) == names  # each applied once: never evicted
    finally:
        rt.stop.set()
        t.join(30)
