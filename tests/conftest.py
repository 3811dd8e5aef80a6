"""Fixtures: each test gets isolated resources on the shared servers `make up` started."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest
import redis
from elasticsearch import Elasticsearch
from sqlalchemy import create_engine, text
from sqlalchemy.engine import Engine

from outbox_app.settings import AppSettings
from tests.auth import API_KEYS

# The owner's URL (migrations, what only an owner may do) and the process roles' URLs (the
# processes under test run as those: tests/db_roles.py).
REQUIRED = ("OUTBOX_DATABASE_URL", "OUTBOX_KAFKA_BOOTSTRAP", "OUTBOX_S3_ENDPOINT", "OUTBOX_ES_URL",
            "STACK_APP_DATABASE_URL", "STACK_RELAY_DATABASE_URL")


def pytest_configure(config: pytest.Config) -> None:
    missing = [k for k in REQUIRED if not os.environ.get(k)]
    if missing:
        raise pytest.UsageError(
            f"{', '.join(missing)} not set: run the tests with `make test` (it starts the stack "
            "and sources .outbox/env)"
        )


@pytest.fixture
def uid() -> str:
    """A short unique token for naming this test's resources."""
    return uuid.uuid4().hex[:10]


@pytest.fixture
def base_settings() -> AppSettings:
    return AppSettings()


@pytest.fixture
def pg_schema(base_settings: AppSettings, uid: str) -> Iterator[str]:
    """A fresh PostgreSQL schema, dropped after the test."""
    name = f"t_{uid}"
    # Pre-ping: a test may restart the server between setup and teardown.
    engine = create_engine(base_settings.database_url, pool_pre_ping=True)
    with engine.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{name}"'))
    yield name
    with engine.begin() as conn:
        conn.execute(text(f'DROP SCHEMA "{name}" CASCADE'))
    engine.dispose()


@pytest.fixture
def settings(base_settings: AppSettings, pg_schema: str, uid: str) -> AppSettings:
    """Settings whose schema, topic prefix, index and Redis prefix belong to this test only."""
    return base_settings.model_copy(
        update={
            "db_schema": pg_schema,
            "topic_prefix": f"t{uid}",
            "es_index": f"t{uid}-images",
            "redis_prefix": f"t{uid}",
        }
    )


@pytest.fixture
def raw_engine(base_settings: AppSettings) -> Iterator[Engine]:
    engine = create_engine(base_settings.database_url)
    yield engine
    engine.dispose()


@pytest.fixture
def es(base_settings: AppSettings) -> Iterator[Elasticsearch]:
    client = Elasticsearch(base_settings.es_url)
    yield client
    client.close()


@pytest.fixture
def redis_client(base_settings: AppSettings) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(base_settings.redis_url)
    yield client
    client.close()


@pytest.fixture
def migrated(settings: AppSettings) -> AppSettings:
    """This test's settings (the owner's), with the migrations applied to its schema and the
    process roles' grants (`outbox grants`) to it."""
    from outbox.migrate import migrate
    from tests.db_roles import apply_grants

    migrate(settings)
    apply_grants(settings)
    return settings


@pytest.fixture
def engine(migrated: AppSettings) -> Iterator[Engine]:
    from outbox.db import make_engine

    eng = make_engine(migrated)
    yield eng
    eng.dispose()


@pytest.fixture
def api_settings(migrated: AppSettings) -> AppSettings:
    from pydantic import SecretStr

    return migrated.model_copy(
        update={"api_keys": SecretStr(API_KEYS), "max_upload_bytes": 200_000}
    )


@pytest.fixture
def api(api_settings: AppSettings) -> Iterator:
    """The HTTP API in process (real PostgreSQL and S3 behind it), as the application's
    role."""
    from fastapi.testclient import TestClient

    from outbox_app.api.app import create_app
    from tests.db_roles import as_app

    app = create_app(as_app(api_settings))
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client
    app.state.ctx.engine.dispose()


@pytest.fixture
def relay_settings(migrated: AppSettings) -> AppSettings:
    """This test's settings, with a relay that reacts within a second."""
    return migrated.model_copy(update={"relay_poll_interval_s": 0.2, "relay_lock_poll_s": 0.3,
                                       "relay_heartbeat_s": 0.5})


@pytest.fixture
def relays(relay_settings: AppSettings, tmp_path) -> Iterator:
    """Start relay processes (as the relay's role unless OUTBOX_DATABASE_URL is given); all
    are stopped, and the slot dropped, after the test."""
    from tests.relay_harness import RelayProc, drop_slot_and_publication

    started: list[RelayProc] = []

    def start(mode: str, **extra_env: str) -> RelayProc:
        proc = RelayProc(relay_settings, mode, tmp_path / f"relay-{len(started)}.log",
                         **extra_env)
        started.append(proc)
        return proc

    yield start
    for p in started:
        p.stop()
    drop_slot_and_publication(relay_settings)


@pytest.fixture(scope="module")
def pipeline(cfg: AppSettings) -> Iterator:
    """The relay and the four projectors on threads, for a module's own `cfg` fixture."""
    from tests.pipeline_harness import PROJECTOR_NAMES, Pipeline

    p = Pipeline(cfg)
    p.start_relay()
    for name in PROJECTOR_NAMES:
        p.start_projector(name)
    yield p
    p.stop()
