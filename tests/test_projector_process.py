"""Projectors as processes and as a group against the real broker and Redis: SIGTERM
drains and commits, a rebalance loses nothing."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import uuid
from datetime import UTC, datetime

import pytest
import redis
from confluent_kafka import Producer

from outbox.envelope import EventEnvelope
from projectors.registry import build_runtime
from relays.publisher import TopicManager
from tests.pipeline_harness import committed_offsets, wait_for
from tests.relay_harness import ROOT, free_port, health_of, settings_env

pytestmark = pytest.mark.slow


def _image_event(image_id: str, version: int) -> bytes:
    return EventEnvelope(id=uuid.uuid4(), type="image.ocr_requested", aggregate_type="image",
                         aggregate_id=image_id, aggregate_version=version,
                         occurred_at=datetime.now(UTC),
                         payload={"id": image_id, "state": "ocr_pending", "version": version,
                                  "attempts": 0}).to_json()


def _produce_images(settings, count: int) -> tuple[str, list[str]]:
    topic = f"{settings.topic_prefix}.image"
    TopicManager(settings).ensure(topic)
    ids = [str(uuid.uuid4()) for _ in range(count)]
    p = Producer({"bootstrap.servers": settings.kafka_bootstrap})
    for image_id in ids:
        p.produce(topic, key=image_id.encode(), value=_image_event(image_id, 3))
    assert p.flush(10) == 0
    return topic, ids


def _cached(settings, ids: list[str]) -> int:
    r = redis.Redis.from_url(settings.redis_url)
    return sum(r.exists(f"{settings.redis_prefix}:task:{i}") for i in ids)


def test_projector_process_drains_on_sigterm(settings, tmp_path):
    topic, ids = _produce_images(settings, 300)
    port = free_port()
    log = open(tmp_path / "cache.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [sys.executable, "-m", "outbox.cli", "project", "cache", "--metrics-port", str(port)],
        env={**os.environ, **settings_env(settings)}, cwd=ROOT, stdout=log,
        stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: (health_of(port) or {}).get("last_applied_at"), timeout_s=60,
                 what="first batch applied")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    # Whatever it applied is committed; nothing committed that was not applied.
    committed = committed_offsets(settings, f"{settings.topic_prefix}.cache", topic)
    assert 0 < committed <= _cached(settings, ids)
    assert b"projector_stopped" in (tmp_path / "cache.log").read_bytes()


class SteadyImageWriter(threading.Thread):
    """Produces a few image events every 50 ms until stopped, so that both rebalances of
    the test happen while messages are still arriving."""

    def __init__(self, settings) -> None:
        super().__init__(daemon=True)
        self.topic = f"{settings.topic_prefix}.image"
        TopicManager(settings).ensure(self.topic)
        self.ids: list[str] = []
        self.halt = threading.Event()
        self.unflushed = -1
        self._producer = Producer({"bootstrap.servers": settings.kafka_bootstrap})

    def run(self) -> None:
        while not self.halt.is_set():
            for _ in range(5):
                image_id = str(uuid.uuid4())
                self._producer.produce(self.topic, key=image_id.encode(),
                                       value=_image_event(image_id, 3))
                self.ids.append(image_id)
            self._producer.poll(0)
            self.halt.wait(0.05)
        self.unflushed = self._producer.flush(10)


def test_a_rebalance_loses_nothing(settings):
    small = settings.model_copy(update={"projector_batch_size": 20,
                                        "projector_session_timeout_ms": 6000})
    writer = SteadyImageWriter(small)
    writer.start()
    first = build_runtime(small, "cache")
    threads = [threading.Thread(target=first.run, daemon=True)]
    threads[0].start()
    wait_for(lambda: _cached(small, list(writer.ids)) > 0, timeout_s=60,
             what="first consumer applying")
    second = build_runtime(small, "cache")  # joins the group: partitions move
    threads.append(threading.Thread(target=second.run, daemon=True))
    threads[1].start()
    wait_for(lambda: second.health()["assigned_partitions"] > 0, timeout_s=60,
             what="second consumer assigned")
    first.stop.set()  # leaves the group: its partitions move again
    threads[0].join(30)
    wait_for(lambda: second.health()["assigned_partitions"] == small.topic_partitions,
             timeout_s=60, what="the remaining consumer owns every partition")
    writer.halt.set()
    writer.join(30)
    assert writer.unflushed == 0
    ids = writer.ids
    wait_for(lambda: committed_offsets(small, first.group_id, writer.topic) == len(ids),
             timeout_s=60, what="everything committed")
    assert _cached(small, ids) == len(ids)
    second.stop.set()
    threads[1].join(30)
