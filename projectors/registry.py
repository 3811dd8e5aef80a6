"""The projectors by name, and running one as its own process (`outbox project <name>`)."""

from __future__ import annotations

import threading
from collections.abc import Callable

import redis
from elasticsearch import Elasticsearch

from images.storage import s3_client
from outbox.db import make_engine
from outbox.observability import serve_until_stopped
from projectors.runtime import ConsumerRuntime, Projector
from projectors.settings import ProjectorSettings
from projectors.sink_probes import SINKS, store_probes
from projectors.views.search import SearchProjector
from projectors.views.task_cache import TaskCache, TaskCacheProjector
from projectors.workers.embed import EmbeddingWorker
from projectors.workers.embedder import get_embedder
from projectors.workers.ocr import OcrWorker

StopCheck = Callable[[], bool]

# Defaults that let the four projectors run side by side on one host.
METRICS_PORTS = {"ocr": 9465, "embed": 9466, "search": 9467, "cache": 9468}


def _ocr(s: ProjectorSettings, should_stop: StopCheck) -> Projector:
    # OCR takes about a second per image: it checks between images for a stop, or for its
    # batch being revoked.
    return OcrWorker(s, make_engine(s), s3_client(s), should_stop=should_stop)


def _embed(s: ProjectorSettings, should_stop: StopCheck) -> Projector:
    return EmbeddingWorker(s, make_engine(s), get_embedder(s.embedding_model))


def _search(s: ProjectorSettings, should_stop: StopCheck) -> Projector:
    tasks = TaskCache(s, redis.Redis.from_url(s.redis_url))
    return SearchProjector(s, Elasticsearch(s.es_url), tasks)


def _cache(s: ProjectorSettings, should_stop: StopCheck) -> Projector:
    client = redis.Redis.from_url(s.redis_url)
    return TaskCacheProjector(TaskCache(s, client), client)


PROJECTORS: dict[str, Callable[[ProjectorSettings, StopCheck], Projector]] = {
    "ocr": _ocr, "embed": _embed, "search": _search, "cache": _cache,
}


def build_runtime(settings: ProjectorSettings, name: str, *, group_id: str | None = None,
                  stop: threading.Event | None = None) -> ConsumerRuntime:
    """The consumer runtime of projector `name`."""
    stop = stop or threading.Event()
    abandon = threading.Event()
    projector = PROJECTORS[name](settings, lambda: stop.is_set() or abandon.is_set())
    return ConsumerRuntime(settings, projector, group_id=group_id, stop=stop,
                           abandon=abandon, sink_probes=store_probes(settings, SINKS[name]))


def serve_projector(settings: ProjectorSettings, name: str, host: str, port: int) -> int:
    """Run one projector until SIGTERM (the batch in hand is finished and committed)."""
    runtime = build_runtime(settings, name)
    return serve_until_stopped(runtime.stop, runtime.health, host, port, runtime.run,
                               ready=runtime.readiness, stalled=runtime.stalled)
