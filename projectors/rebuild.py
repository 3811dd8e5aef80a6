"""`outbox rebuild <name>`: build a view again from the log, without downtime.

The new copy (a concrete index, or a new generation of task-cache keys) is filled by a
consumer group of its own replaying the topics from the start, while the live one keeps
serving. When the rebuild has caught up with the live projector's committed position, the
readers are switched in one step (one `_aliases` call; one pointer key), the rebuild keeps
consuming until it has also covered what the live projector committed around the switch,
and the old copy is removed. No OCR or embedding runs again: their results are events.
`Rebuild` is the shared procedure; a projector whose spec declares `rebuild` supplies a
subclass (`outbox_app.view_rebuilds` has the image application's search and cache views').

An interrupted rebuild (SIGTERM, SIGKILL) leaves its unfinished copy marked as such and its
consumer group's offsets; running the command again resumes it. Readers never see an
unfinished copy. One rebuild of a view runs at a time (`projectors.rebuild_lock`): a second
one, by hand or by the reconciler's healing of a lost view, is refused with `RebuildBusy`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import structlog
from confluent_kafka import KafkaException, TopicPartition

from outbox.kafka import make_admin, make_reader
from outbox.wire_formats import event_topic
from projectors.rebuild_lock import RebuildLock
from projectors.runtime import ConsumerRuntime, Projector, live_group
from projectors.settings import RuntimeSettings

log = structlog.get_logger(__name__)

SWITCH_SETTLE_S = 10.0  # how long the live projector may take to commit a batch in hand
REPLAY_BATCH = 2000


@dataclass
class Progress:
    """What a rebuild reports while it runs."""

    applied: int = 0
    lag: int | None = None  # live committed minus rebuild committed, summed
    phase: str = "replaying"


class RebuildRefused(RuntimeError):
    """The rebuilt copy failed verification: the readers were not switched."""


def committed(settings: RuntimeSettings, group: str, topics: list[str]
              ) -> dict[tuple[str, int], int]:
    """The committed offset of `group` on every partition of `topics` (0 where none)."""
    consumer = make_reader(settings, group)
    try:
        parts = []
        metadata = consumer.list_topics(timeout=10).topics
        for topic in topics:
            if topic in metadata:
                parts += [TopicPartition(topic, p) for p in metadata[topic].partitions]
        got = consumer.committed(parts, timeout=10) if parts else []
        return {(tp.topic, tp.partition): max(tp.offset, 0) for tp in got}
    finally:
        consumer.close()


def live_members(settings: RuntimeSettings, group: str) -> int:
    """How many consumers `group` has now (assumed some when the broker cannot say)."""
    admin = make_admin(settings)
    try:
        described = admin.describe_consumer_groups([group])[group].result(timeout=10)
    except KafkaException:
        return 1
    return len(described.members)


class Rebuild:
    """The shared procedure; a view supplies its copy, its projector and its switch.
    `view` is the projector's name (its live consumer group is `live_group(view)`);
    `aggregate_types` are the ones its projector reads."""

    view = ""

    def __init__(self, settings: RuntimeSettings, aggregate_types: Sequence[str],
                 on_progress: Callable[[Progress], None] = lambda _: None,
                 poll_s: float = 0.5) -> None:
        self.settings = settings
        self.topics = [event_topic(settings, t) for t in aggregate_types]
        self.live_group = live_group(settings, self.view)
        self.progress = Progress()
        self._on_progress = on_progress
        self._poll_s = poll_s
        self.stop = threading.Event()

    # What a view provides.
    def prepare(self) -> str: ...
    def projector(self, copy: str) -> Projector: ...
    def verify(self, copy: str) -> list[str]: ...
    def switch(self, copy: str) -> None: ...
    def finish(self, copy: str, keep_old: bool) -> list[str]: ...

    def run(self, verify: bool = False, keep_old: bool = False) -> dict[str, object]:
        """Build, switch, clean up; return a summary. Raises RebuildRefused when --verify
        found drift (the copy is kept, unfinished, for inspection), RebuildBusy when another
        process is rebuilding this view now."""
        with RebuildLock(self.settings, self.view):
            return self._run(verify, keep_old)

    def _run(self, verify: bool, keep_old: bool) -> dict[str, object]:
        copy = self.prepare()
        group = f"{self.settings.topic_prefix}.{self.view}.rebuild.{copy.replace(':', '-')}"
        # Larger batches than the live projector's: a replay is throughput, not latency.
        replay = self.settings.model_copy(update={"projector_batch_size": max(
            REPLAY_BATCH, self.settings.projector_batch_size)})
        runtime = ConsumerRuntime(replay, self.projector(copy), group_id=group, stop=self.stop,
                                  track_end=True)
        thread = threading.Thread(target=runtime.run, name="rebuild", daemon=True)
        thread.start()
        started = time.monotonic()
        try:
            self._follow(group, runtime)
            if verify:
                drift = self.verify(copy)
                if drift:
                    raise RebuildRefused(f"{len(drift)} differences, first: {drift[0]}")
            before_switch = committed(self.settings, self.live_group, self.topics)
            self.switch(copy)
            self.progress.phase = "switched"
            self._follow(group, runtime, self._settled_live(before_switch))
        finally:
            self.stop.set()
            thread.join(60)
        removed = self.finish(copy, keep_old)
        return {"view": self.view, "copy": copy, "events_applied": self.progress.applied,
                "seconds": round(time.monotonic() - started, 2), "removed": removed}

    def _settled_live(self, before: dict[tuple[str, int], int]) -> dict[tuple[str, int], int]:
        """The live position that covers every batch it applied before the switch: its next
        commit (a batch in hand is committed before the next poll), or, when it commits
        nothing new for a while, the position it had."""
        deadline = time.monotonic() + SWITCH_SETTLE_S
        while time.monotonic() < deadline:
            now = committed(self.settings, self.live_group, self.topics)
            if now != before:
                return now
            time.sleep(self._poll_s)
        return before

    def _follow(self, group: str, runtime: ConsumerRuntime,
                target: dict[tuple[str, int], int] | None = None) -> None:
        """Consume until the rebuild's committed position reaches `target` (default: the
        live projector's, read as it moves). When the live projector never committed (it
        never ran, or its offsets expired), that position says nothing: the target is then
        the end of the log, every partition read to its end."""
        while not self.stop.is_set():
            try:
                goal = target or committed(self.settings, self.live_group, self.topics)
                mine = committed(self.settings, group, self.topics)
            except KafkaException as exc:  # the broker restarting: ask again
                log.warning("rebuild_position_unavailable", error=str(exc))
                time.sleep(self._poll_s)
                continue
            lag = sum(max(0, off - mine.get(tp, 0)) for tp, off in goal.items())
            self.progress.lag = lag
            self.progress.applied = runtime.applied
            self._on_progress(self.progress)
            if any(goal.values()):
                if lag == 0:
                    return
            elif goal and runtime.at_end >= set(goal):
                return
            time.sleep(self._poll_s)
        raise InterruptedError("the rebuild was stopped; run it again to resume")
