"""Schema-driven fuzzing of the HTTP API: no input produces a server error."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest
import schemathesis
from elasticsearch import Elasticsearch
from hypothesis import HealthCheck, settings
from pydantic import SecretStr
from sqlalchemy import create_engine, text

from outbox.migrate import migrate
from outbox_app.api.app import create_app
from outbox_app.settings import AppSettings
from outbox_app.views.search_index import ensure_index
from tests.auth import API_KEYS

FUZZ_EXAMPLES = int(os.environ.get("OUTBOX_FUZZ_EXAMPLES", "40"))
RUN = uuid.uuid4().hex[:8]
CONFIG = AppSettings(db_schema=f"fuzz_{RUN}", es_index=f"fuzz{RUN}-images",
                  api_keys=SecretStr(API_KEYS))
APP = create_app(CONFIG)
schema = schemathesis.openapi.from_asgi("/openapi.json", APP)


@pytest.fixture(scope="module", autouse=True)
def _fuzz_resources() -> Iterator[None]:
    # The search view exists, so search requests reach the query code rather than the
    # documented 503 of an unbuilt view.
    migrate(CONFIG)
    es = Elasticsearch(CONFIG.es_url)
    ensure_index(es, CONFIG)
    yield
    es.indices.delete(index=f"{CONFIG.es_index}-v1")
    es.close()
    APP.state.ctx.engine.dispose()
    engine = create_engine(CONFIG.database_url)
    with engine.begin() as conn:
        conn.execute(text(f'DROP SCHEMA "{CONFIG.db_schema}" CASCADE'))
    engine.dispose()


@pytest.mark.slow
@schema.parametrize()
@settings(max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_server_errors(case):
    # Half the cases carry a valid key, so the handlers behind auth are reached too.
    headers = {"Authorization": "Bearer key-a"} if hash(repr(case.body)) % 2 else {}
    response = case.call(headers=headers)
    assert response.status_code < 500, (case.method, case.path, case.body, response.text)
