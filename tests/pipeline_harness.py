"""Running the whole pipeline in one test process: the relay and the four projectors on
threads, each with its own stop event, against the real services."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from confluent_kafka import Consumer, TopicPartition
from prometheus_client import REGISTRY

from app.settings import AppSettings
from projectors.registry import build_runtime
from projectors.runtime import ConsumerRuntime
from relays.runner import RelayProcess

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
        self.relay = RelayProcess(self.settings, "logical")
        t = threading.Thread(target=self.relay.run, daemon=True)
        t.start()
        self.threads.append(t)
        while not self.relay.leader:
            time.sleep(0.05)

    def start_projector(self, name: str, group_id: str | None = None) -> ConsumerRuntime:
        rt = build_runtime(self.settings, name, group_id=group_id)
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


def wait_for(predicate, timeout_s: float = 120, interval_s: float = 0.3, what: str = ""):
    """Poll until `predicate()` is truthy; return its value or fail with `what`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)
    raise AssertionError(f"timed out waiting for {what or predicate}")
