"""`outbox rebuild <name>`: build a view again from the log, without downtime.

The new copy (a concrete index, or a new generation of task-cache keys) is filled by a
consumer group of its own replaying the topics from the start, while the live one keeps
serving. When the rebuild has caught up with the live projector's committed position, the
readers are switched in one step (one `_aliases` call; one pointer key), the rebuild keeps
consuming until it has also covered what the live projector committed around the switch,
and the old copy is removed. No OCR or embedding runs again: their results are events.
`Rebuild` is the shared procedure; a projector whose spec declares `rebuild` supplies a
subclass (`SearchRebuild` and `CacheRebuild` are the built-in views').

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
from datetime import UTC, datetime

import redis
import structlog
from confluent_kafka import KafkaException, TopicPartition
from elasticsearch import Elasticsearch

from outbox.kafka import make_admin, make_reader
from outbox.wire_formats import event_topic
from projectors.rebuild_lock import RebuildLock
from projectors.runtime import ConsumerRuntime, Projector, live_group
from projectors.settings import ProjectorSettings, RuntimeSettings
from projectors.views.search import SearchProjector
from projectors.views.search_index import (
    aliased_indices,
    create_index,
    is_complete,
    mark_complete,
)
from projectors.views.task_cache import GENERATION_TTL_S, TaskCache, TaskCacheProjector

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


class SearchRebuild(Rebuild):
    """A new concrete index behind the alias."""

    view = "search"

    def __init__(self, settings: ProjectorSettings, es: Elasticsearch,
                 verify_copy: Callable[[str], list[str]] | None = None, **kwargs: object) -> None:
        super().__init__(settings, SearchProjector.aggregate_types,
                         **kwargs)  # type: ignore[arg-type]
        self.es = es
        self.alias = settings.es_index
        self.verify_copy = verify_copy  # the app's audit of a copy, for --verify

    def prepare(self) -> str:
        """Resume an unfinished index from an interrupted rebuild, or create one."""
        live = set(aliased_indices(self.es, self.alias))
        unfinished = [i for i in sorted(self.es.indices.get(index=f"{self.alias}-r*"))
                      if i not in live and not is_complete(self.es, i)]
        if unfinished:
            for stale in unfinished[:-1]:
                self.es.indices.delete(index=stale)
            log.info("rebuild_resumed", index=unfinished[-1])
            return unfinished[-1]
        name = f"{self.alias}-r{datetime.now(UTC):%Y%m%d%H%M%S}"
        create_index(self.es, name, complete=False)
        log.info("rebuild_started", index=name)
        return name

    def projector(self, copy: str) -> Projector:
        # A client of its own: the runtime closes its projector's clients when it stops.
        return SearchProjector(self.settings, Elasticsearch(self.settings.es_url), None,
                               index=copy)

    def verify(self, copy: str) -> list[str]:
        if self.verify_copy is None:
            return []
        self.es.indices.refresh(index=copy)  # the audit's scan searches it
        return self.verify_copy(copy)

    def switch(self, copy: str) -> None:
        """Point the alias at the new index and away from the old, in one call."""
        self.es.indices.refresh(index=copy)  # the replay wrote without refreshing
        old = aliased_indices(self.es, self.alias)
        actions = [{"remove": {"index": i, "alias": self.alias}} for i in old]
        actions.append({"add": {"index": copy, "alias": self.alias}})
        self.es.indices.update_aliases(actions=actions)
        mark_complete(self.es, copy)
        self._old = old
        log.info("alias_switched", alias=self.alias, to=copy, away_from=old)

    def finish(self, copy: str, keep_old: bool) -> list[str]:
        if keep_old:
            return []
        for index in self._old:
            self.es.indices.delete(index=index, ignore_unavailable=True)
        return self._old


class CacheRebuild(Rebuild):
    """A new generation of task-cache keys, switched by the generation pointer."""

    view = "cache"

    def __init__(self, settings: ProjectorSettings, client: redis.Redis, **kwargs: object
                 ) -> None:
        super().__init__(settings, TaskCacheProjector.aggregate_types,
                         **kwargs)  # type: ignore[arg-type]
        self.redis = client
        self.live = TaskCache(settings, client)

    def prepare(self) -> str:
        """Resume the generation an interrupted rebuild left, or start the next one."""
        building = self.redis.get(self.live.building_key)
        if building is not None:
            return f"g{int(building)}"
        nxt = self.live.generation() + 1
        self.redis.set(self.live.building_key, nxt)
        return f"g{nxt}"

    def projector(self, copy: str) -> Projector:
        client = redis.Redis.from_url(self.settings.redis_url)  # closed with the runtime
        return TaskCacheProjector(TaskCache(self.settings, client, generation=int(copy[1:])),
                                  client)

    def verify(self, copy: str) -> list[str]:
        return []

    def switch(self, copy: str) -> None:
        """Carry the search view's index_* fields over, then move the pointer."""
        new = TaskCache(self.settings, self.redis, generation=int(copy[1:]))
        self._old_generation = self.live.generation()
        self.live.copy_index_fields(new)
        self.redis.set(self.live.generation_key, int(copy[1:]))
        self.redis.set(self.live.marker_key, copy)  # the cache is whole again
        self.redis.delete(self.live.building_key)
        time.sleep(GENERATION_TTL_S)  # until every writer follows the pointer
        log.info("cache_generation_switched", generation=copy)

    def finish(self, copy: str, keep_old: bool) -> list[str]:
        if keep_old:
            return []
        old = TaskCache(self.settings, self.redis, generation=self._old_generation)
        return [f"{old.delete_all()} keys of generation {self._old_generation}"]
