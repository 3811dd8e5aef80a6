"""The view healer against the real stores, the pipeline on threads: two healers that find
the live index deleted at once rebuild it once, behind the alias, and `outbox rebuild
search` is refused meanwhile; a flushed task cache is noticed by its marker and rebuilt; a
view whose projector never committed is not lost."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import redis
from elasticsearch import Elasticsearch
from fastapi.testclient import TestClient

from outbox_app.api.app import create_app
from outbox_app.view_healing import ViewHealer, builtin_views
from outbox_app.views.search_index import aliased_indices
from outbox_app.views.task_cache import TaskCache
from tests.auth import AUTH_A
from tests.images import is_searchable, submit_receipt
from tests.pipeline_harness import isolated_settings, metric, wait_for
from tests.relay_harness import ROOT, settings_env

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cfg():
    with isolated_settings("vheal") as s:
        yield s


@pytest.fixture(scope="module")
def born(cfg):
    """A first check before the pipeline runs: the views are born (never built, not lost),
    as when the reconciler starts with the projectors."""
    es, client = Elasticsearch(cfg.es_url), redis.Redis.from_url(cfg.redis_url)
    assert ViewHealer(builtin_views(cfg, es, client)).check() == {"search": "ok", "cache": "ok"}
    es.close()
    client.close()


@pytest.fixture(scope="module")
def api(cfg):
    with TestClient(create_app(cfg), raise_server_exceptions=False) as client:
        yield client


def _healer(cfg, es: Elasticsearch, client: redis.Redis) -> ViewHealer:
    return ViewHealer(builtin_views(cfg, es, client))


def _rebuilds(outcome: str, view: str = "search") -> float:
    return metric("outbox_view_rebuilds_total", view=view, outcome=outcome)


def test_views_never_built_are_not_lost():
    with isolated_settings("vnew") as cfg:
        es, client = Elasticsearch(cfg.es_url), redis.Redis.from_url(cfg.redis_url)
        healer = _healer(cfg, es, client)
        assert healer.check() == {"search": "ok", "cache": "ok"}
        # The cache's marker is born with it, so a later flush is told apart.
        assert client.exists(TaskCache(cfg, client).marker_key)
        es.close()
        client.close()


def test_two_healers_rebuild_a_deleted_index_once_and_a_manual_rebuild_waits(cfg, born,
                                                                             pipeline, api):
    image = submit_receipt(api, "Index deleted")
    wait_for(lambda: is_searchable(api, image), what="searchable")
    es, client = Elasticsearch(cfg.es_url), redis.Redis.from_url(cfg.redis_url)
    first, second = _healer(cfg, es, client), _healer(cfg, es, client)
    assert first.check() == second.check() == {"search": "ok", "cache": "ok"}
    before = {o: _rebuilds(o) for o in ("succeeded", "locked")}
    lost_before = metric("outbox_view_lost_total", view="search")
    es.indices.delete(index=aliased_indices(es, cfg.es_index))
    assert first.check()["search"] == "rebuilding"
    wait_for(lambda: metric("outbox_view_rebuild_in_progress", view="search") == 1,
             timeout_s=10, interval_s=0.05, what="the first healer rebuilding")
    time.sleep(0.5)  # its lock is taken before anything else
    second.check()
    env = {**os.environ, **settings_env(cfg)}
    manual = subprocess.run([sys.executable, "-m", "outbox.cli", "rebuild", "search"], env=env,
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert manual.returncode == 3, manual.stderr
    assert "another rebuild" in manual.stderr
    first.wait(180)
    second.wait(180)
    assert len(aliased_indices(es, cfg.es_index)) == 1
    assert _rebuilds("succeeded") - before["succeeded"] == 1
    assert _rebuilds("locked") - before["locked"] == 1
    assert metric("outbox_view_lost_total", view="search") - lost_before == 2  # each saw it
    assert first.check()["search"] == second.check()["search"] == "ok"
    wait_for(lambda: is_searchable(api, image), what="searchable in the rebuilt view")
    later = submit_receipt(api, "After the rebuild")  # the live projector writes through the alias
    wait_for(lambda: is_searchable(api, later), what="a new image searchable")
    es.close()
    client.close()


def test_a_flushed_task_cache_is_noticed_and_rebuilt(cfg, born, pipeline, api):
    image = submit_receipt(api, "Cache flushed")
    wait_for(lambda: is_searchable(api, image), what="searchable")
    es, client = Elasticsearch(cfg.es_url), redis.Redis.from_url(cfg.redis_url)
    healer = _healer(cfg, es, client)
    assert healer.check()["cache"] == "ok"
    tasks = TaskCache(cfg, client)
    version = api.get(f"/v1/images/{image}", headers=AUTH_A).json()["version"]
    for key in client.scan_iter(f"{cfg.redis_prefix}:*"):  # this test's keys: a flush
        client.delete(key)
    before = _rebuilds("succeeded", "cache")
    assert healer.check()["cache"] == "rebuilding"
    healer.wait(180)
    assert _rebuilds("succeeded", "cache") - before == 1
    assert client.exists(tasks.marker_key)
    assert TaskCache(cfg, client).versions([image]) == {image: version}
    assert healer.check()["cache"] == "ok"
    es.close()
    client.close()
