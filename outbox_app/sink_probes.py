"""Readiness probes of the stores the built-in projectors (and the API) write or read: the
search server, Redis, the bucket and PostgreSQL. Each is a cheap call on a client of its own with
short timeouts and no retries (see `outbox/readiness.py`).

Each store's client is imported by its probe only: a projector installed with one extra
(the OCR worker's, say) probes its own stores without the others' clients."""

from __future__ import annotations

from outbox.db import libpq_dsn
from outbox.readiness import PROBE_TIMEOUT_S, Probe, postgres_probe
from outbox_app.settings import ProjectorSettings
from outbox_images.settings import ImageSettings


def search_probe(url: str, timeout_s: float = PROBE_TIMEOUT_S) -> Probe:
    """The search server's root (`GET /`)."""
    from elasticsearch import Elasticsearch

    client = Elasticsearch(url, request_timeout=timeout_s, max_retries=0)
    return client.info


def redis_probe(url: str, timeout_s: float = PROBE_TIMEOUT_S) -> Probe:
    """`PING`."""
    from redis import Redis

    client = Redis.from_url(url, socket_connect_timeout=timeout_s, socket_timeout=timeout_s)
    return client.ping


def s3_probe(settings: ImageSettings, timeout_s: float = PROBE_TIMEOUT_S) -> Probe:
    """`HEAD` of the bucket."""
    from outbox_images.storage import s3_client

    client = s3_client(settings, timeout_s=timeout_s)
    return lambda: client.head_bucket(Bucket=settings.s3_bucket)


def store_probes(settings: ProjectorSettings, names: tuple[str, ...]) -> dict[str, Probe]:
    """The probes called `names` (database, s3, search, redis) for these settings."""
    makers = {"database": lambda: postgres_probe(libpq_dsn(settings)),
              "s3": lambda: s3_probe(settings),
              "search": lambda: search_probe(settings.es_url),
              "redis": lambda: redis_probe(settings.redis_url)}
    return {name: makers[name]() for name in names}
