"""The FastAPI application of the example image service."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import redis
from elasticsearch import Elasticsearch
from fastapi import FastAPI, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from outbox.db import make_engine
from outbox.readiness import CachedProbes, PublishedReadiness, readiness_report
from outbox_app.api.auth import ApiKeys
from outbox_app.api.body_limit import BodySizeLimit
from outbox_app.api.errors import install_error_handlers
from outbox_app.api.images import ApiContext, image_router
from outbox_app.api.request_metrics import measure_requests
from outbox_app.api.request_spans import RequestSpans
from outbox_app.api.search import search_router
from outbox_app.api.status_page import status_router
from outbox_app.settings import AppSettings, get_app_settings
from outbox_app.sink_probes import store_probes
from outbox_app.trace import ImageTrace
from outbox_app.views.search_reader import SearchReader
from outbox_app.views.task_cache import TaskCache
from outbox_app.workers.embedder import get_embedder
from outbox_images.storage import presigning_client, s3_client

# Redis is only the task cache here: a read that cannot connect or answer gives up quickly so
# the image read degrades instead of hanging (redis-py waits forever by default).
REDIS_TIMEOUT_S = 2.0
# What the API serves without: search answers 503 and image reads leave out the task states.
OPTIONAL_STORES = ("search", "redis")


def create_app(settings: AppSettings | None = None) -> FastAPI:
    """Build the API for `settings` (default: from the environment)."""
    settings = settings or get_app_settings()
    model = settings.embedding_model

    def query_vector(q: str) -> list[float]:
        return get_embedder(model).query(q).tolist()

    engine, s3 = make_engine(settings), s3_client(settings)
    es = Elasticsearch(settings.es_url)
    client = redis.Redis.from_url(settings.redis_url, socket_connect_timeout=REDIS_TIMEOUT_S,
                                  socket_timeout=REDIS_TIMEOUT_S)
    ctx = ApiContext(
        settings=settings,
        engine=engine,
        s3=s3,
        presigner=presigning_client(settings),
        keys=ApiKeys(settings.api_keys.get_secret_value()),
        search=SearchReader(es, settings.es_index, query_vector),
        tasks=TaskCache(settings, client),
        trace=ImageTrace(settings, engine, es, client, s3),
    )

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        ctx.engine.dispose()

    app = FastAPI(title="outbox-sidecar example API", version="1", lifespan=lifespan)
    install_error_handlers(app)
    # Added before the metrics middleware, so that a refused body is counted too.
    app.add_middleware(BodySizeLimit, limit=settings.max_request_body_bytes)
    app.include_router(image_router(ctx))
    app.include_router(search_router(ctx))
    app.include_router(status_router(ctx))

    @app.get("/metrics", include_in_schema=False)
    def metrics() -> Response:
        """Prometheus metrics of this process."""
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    app.state.ctx = ctx
    measure_requests(app)

    @app.get("/healthz", tags=["ops"])
    def healthz() -> JSONResponse:
        """Liveness: the process answers. It does not depend on the stores (an outage of one
        must not restart every API process); `/readyz` does."""
        return JSONResponse({"status": "ok"})

    probes = CachedProbes(store_probes(settings, ("database", *OPTIONAL_STORES)))
    published = PublishedReadiness()

    @app.get("/readyz", tags=["ops"])
    def readyz() -> JSONResponse:
        """Readiness: 200 while PostgreSQL answers (uploads and image reads need nothing
        else), else 503. The search server and Redis are checked too: while one is down the
        body says `degraded` and names it, and only its own endpoints answer 503. Each
        component shows a status and a short code; the reason of a change goes to the log."""
        report = published.publish(readiness_report(probes.results(),
                                                    optional=OPTIONAL_STORES))
        return JSONResponse(report, status_code=200 if report["ready"] else 503)

    # Outermost, so the span covers every other middleware too.
    app.add_middleware(RequestSpans)

    return app
