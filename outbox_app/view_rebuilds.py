"""Rebuilds of the image application's views (`outbox rebuild search|cache`): the shared
procedure of `projectors.rebuild` with a new index behind the search alias, or a new
generation of task-cache keys."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime

import redis
import structlog
from elasticsearch import Elasticsearch

from outbox_app.settings import ProjectorSettings
from outbox_app.views.search import SearchProjector
from outbox_app.views.search_index import (
    aliased_indices,
    create_index,
    is_complete,
    mark_complete,
)
from outbox_app.views.task_cache import GENERATION_TTL_S, TaskCache, TaskCacheProjector
from projectors.rebuild import Rebuild
from projectors.runtime import Projector

log = structlog.get_logger(__name__)


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
