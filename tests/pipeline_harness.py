"""Running the whole pipeline in one test process: the relay and the four projectors on
threads, each with its own stop event, against the real services, the relay as the relay's
role and the projectors as the application's."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import redis
from confluent_kafka import Consumer, TopicPartition
from elasticsearch import Elasticsearch
from prometheus_client import REGISTRY
from pydantic import SecretStr
from sqlalchemy import create_engine, text

from outbox.migrate import migrate
from outbox_app.settings import AppSettings
from outbox_app.views.task_cache import TaskCache
from outbox_images.storage import s3_client
from projectors.registry import build_runtime
from projectors.runtime import ConsumerRuntime
from relays.runner import RelayProcess
from tests.auth import API_KEYS
from tests.db_roles import apply_grants, as_app, as_relay
from tests.relay_harness import drop_slot_and_publication

PROJECTOR_NAMES = ("ocr", "embed", "search", "cache")


def metric(name: str, **labels: str) -> float:
    """A counter's current value in this process (0 when never incremented)."""
    return REGISTRY.get_sample_value(name, labels) or 0.0


def committed_offsets(settings: AppSettings, group: str, topic: str) -> int:
    """The sum over `topic`'s partitions of `group`'s committed offsets (0 where none)."""
    c = Consumer({"bootstrap.servers": settings.kafka_bootstrap, "group.id": group})
    parts = c.list_topics(topic, timeout=10).topics[topic].partitions
    got = c.committed([TopicPartition(topic, p) for p in parts], timeout=10)
    c.close()
    return sum(max(tp.offset, 0) for tp in got)


@dataclass
class Pipeline:
    settings: AppSettings
    relay: RelayProcess | None = None
    runtimes: dict[str, ConsumerRuntime] = field(default_factory=dict)
    threads: list[threading.Thread] = field(default_factory=list)

    def start_relay(self) -> None:
        self.relay = RelayProcess(as_relay(self.settings), "logical")
        t = threading.Thread(target=self.relay.run, daemon=True)
        t.start()
        self.threads.append(t)
        while not self.relay.leader:
            time.sleep(0.05)

    def start_projector(self, name: str, group_id: str | None = None,
                        settings: AppSettings | None = None) -> ConsumerRuntime:
        rt = build_runtime(as_app(settings or self.settings), name, group_id=group_id)
        t = threading.Thread(target=rt.run, daemon=True, name=f"projector-{name}")
        t.start()
        self.threads.append(t)
        self.runtimes[name] = rt
        return rt

    def stop_projector(self, name: str) -> None:
        rt = self.runtimes.pop(name)
        rt.stop.set()

    def stop(self) -> None:
        if self.relay is not None:
            self.relay.stop.set()
        for rt in self.runtimes.values():
            rt.stop.set()
        for t in self.threads:
            t.join(30)


@contextmanager
def isolated_settings(tag: str) -> Iterator[AppSettings]:
    """Settings (the owner's) whose schema (migrated, the process roles granted), topics,
    index and Redis keys belong to the caller; all of it removed afterwards."""
    uid = uuid.uuid4().hex[:8]
    s = AppSettings(db_schema=f"{tag}_{uid}", topic_prefix=f"{tag}{uid}",
                    es_index=f"{tag}{uid}-images", redis_prefix=f"{tag}{uid}",
                    s3_bucket=f"t-{tag}-{uid}", api_keys=SecretStr(API_KEYS),
                    projector_session_timeout_ms=6000, projector_batch_size=50,
                    relay_poll_interval_s=0.2, max_upload_bytes=2_000_000)
    migrate(s)
    apply_grants(s)
    s3 = s3_client(s)
    s3.create_bucket(Bucket=s.s3_bucket)
    try:
        yield s
    finally:
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=s.s3_bucket):
            for obj in page.get("Contents", []):
                s3.delete_object(Bucket=s.s3_bucket, Key=obj["Key"])
        s3.delete_bucket(Bucket=s.s3_bucket)
        drop_slot_and_publication(s)
        engine = create_engine(s.database_url)
        with engine.begin() as conn:
            conn.execute(text(f'drop schema "{s.db_schema}" cascade'))
        engine.dispose()
        es = Elasticsearch(s.es_url)
        for index in es.indices.get(index=f"{s.es_index}-*", ignore_unavailable=True):
            es.indices.delete(index=index)
        es.close()
        r = redis.Redis.from_url(s.redis_url)
        for key in r.scan_iter(f"{s.redis_prefix}:*"):
            r.delete(key)
        r.close()


def cache_at(settings: AppSettings, image_id: str, version: int) -> bool:
    """Whether the task cache holds exactly `version` of the image."""
    client = redis.Redis.from_url(settings.redis_url)
    cached = client.hget(TaskCache(settings, client).key(image_id), "version")
    client.close()
    return cached is not None and int(cached) == version


def wait_for(predicate, timeout_s: float = 120, interval_s: float = 0.3, what: str = ""):
    """Poll until `predicate()` is truthy; return its value or fail with `what`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)
    raise AssertionError(f"timed out waiting for {what or predicate}")
