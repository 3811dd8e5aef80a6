"""The image application's four projectors' declarations, registered in the
`outbox.projectors` group like any other package's. Their clients are imported only when one
is set up, and each needs only its own extra: ocr `[ocr]`, embed `[embedding]`, search and
cache `[views]`."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from outbox.readiness import Probe
from outbox_app.settings import ProjectorSettings, WorkerSettings
from projectors.spec import Projector, ProjectorSpec, StopCheck

if TYPE_CHECKING:
    from projectors.rebuild import Progress, Rebuild


def _outage(exc: BaseException) -> bool:
    from outbox_app.store_errors import is_store_outage

    return is_store_outage(exc)


def _probes(*stores: str) -> Callable[[WorkerSettings], Mapping[str, Probe]]:
    def probes(settings: WorkerSettings) -> Mapping[str, Probe]:
        from outbox_app.sink_probes import store_probes

        return store_probes(settings, stores)
    return probes


def _ocr(s: WorkerSettings, should_stop: StopCheck) -> Projector:
    from outbox.db import make_engine
    from outbox_app.workers.ocr import OcrWorker
    from outbox_images.storage import s3_client

    # OCR takes about a second per image: it checks between images for a stop, or for its
    # batch being revoked.
    return OcrWorker(s, make_engine(s), s3_client(s), should_stop=should_stop)


def _embed(s: WorkerSettings, should_stop: StopCheck) -> Projector:
    from outbox.db import make_engine
    from outbox_app.workers.embed import EmbeddingWorker
    from outbox_app.workers.embedder import get_embedder

    return EmbeddingWorker(s, make_engine(s), get_embedder(s.embedding_model))


def _search(s: ProjectorSettings, should_stop: StopCheck) -> Projector:
    import redis
    from elasticsearch import Elasticsearch

    from outbox_app.views.search import SearchProjector
    from outbox_app.views.task_cache import TaskCache

    tasks = TaskCache(s, redis.Redis.from_url(s.redis_url))
    return SearchProjector(s, Elasticsearch(s.es_url), tasks)


def _cache(s: ProjectorSettings, should_stop: StopCheck) -> Projector:
    import redis

    from outbox_app.views.task_cache import TaskCache, TaskCacheProjector

    client = redis.Redis.from_url(s.redis_url)
    return TaskCacheProjector(TaskCache(s, client), client)


def _search_rebuild(s: ProjectorSettings, on_progress: Callable[[Progress], None]
                    ) -> Rebuild:
    from elasticsearch import Elasticsearch

    from outbox_app.view_rebuilds import SearchRebuild

    return SearchRebuild(s, Elasticsearch(s.es_url), on_progress=on_progress)


def _cache_rebuild(s: ProjectorSettings, on_progress: Callable[[Progress], None]
                   ) -> Rebuild:
    import redis

    from outbox_app.view_rebuilds import CacheRebuild

    return CacheRebuild(s, redis.Redis.from_url(s.redis_url), on_progress=on_progress)


# Default ports 9465-9468 let the four run side by side on one host.
OCR = ProjectorSpec(
    name="ocr", extra="ocr", metrics_port=9465, factory=_ocr, settings=WorkerSettings,
    probes=_probes("database", "s3"), transient=_outage,
    description="OCR of uploaded images; results written back through the outbox")
EMBED = ProjectorSpec(
    name="embed", extra="embedding", metrics_port=9466, factory=_embed, settings=WorkerSettings,
    probes=_probes("database"), transient=_outage,
    description="text embeddings; results written back through the outbox")
SEARCH = ProjectorSpec(
    name="search", extra="views", metrics_port=9467, factory=_search, settings=ProjectorSettings,
    probes=_probes("search", "redis"), transient=_outage, rebuild=_search_rebuild,
    description="the Elasticsearch search view")
CACHE = ProjectorSpec(
    name="cache", extra="views", metrics_port=9468, factory=_cache, settings=ProjectorSettings,
    probes=_probes("redis"), transient=_outage, rebuild=_cache_rebuild,
    description="the Redis task-status view")

# The image pipeline's projectors (the example application's deployment runs these).
BUILTIN: tuple[ProjectorSpec, ...] = (OCR, EMBED, SEARCH, CACHE)
