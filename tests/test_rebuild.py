"""`outbox rebuild` against the real stores: the search view is rebuilt behind its alias while
images keep arriving and a client keeps searching; an interrupted rebuild resumes; the task
cache is rebuilt as a new key generation."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid

import pytest
import redis
from elasticsearch import Elasticsearch
from fastapi.testclient import TestClient
from sqlalchemy import text

from outbox.db import make_engine
from outbox_app.api.app import create_app
from outbox_app.audit import Auditor
from outbox_app.view_rebuilds import SearchRebuild
from outbox_app.views.search_index import aliased_indices
from outbox_images.storage import s3_client
from outbox_images.store import load_image, resync
from tests.auth import AUTH_A
from tests.images import is_searchable, submit_receipt
from tests.pipeline_harness import (
    cache_at,
    isolated_settings,
    metric,
    wait_for,
)
from tests.relay_harness import settings_env

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cfg():
    with isolated_settings("reb") as s:
        yield s


@pytest.fixture(scope="module")
def api(cfg):
    with TestClient(create_app(cfg), raise_server_exceptions=False) as client:
        yield client


def _rebuild(cfg, *args: str) -> subprocess.Popen:
    env = {**os.environ, **settings_env(cfg),
           "OUTBOX_PROJECTOR_SESSION_TIMEOUT_MS": "6000", "OUTBOX_PROJECTOR_BATCH_SIZE": "50"}
    return subprocess.Popen([sys.executable, "-m", "outbox.cli", "rebuild", *args, "--json"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _summary(out: str) -> dict:
    """The summary --json prints last (after the progress bar's output, if any)."""
    return json.loads(out[out.rindex("\n{") + 1:] if "\n{" in out else out)


def test_search_is_rebuilt_behind_the_alias_while_images_arrive(cfg, pipeline, api):
    first = [submit_receipt(api, f"Seed receipt {n}") for n in range(6)]
    for i in first:
        wait_for(lambda i=i: is_searchable(api, i), what=f"{i} searchable")
    es = Elasticsearch(cfg.es_url)
    old = aliased_indices(es, cfg.es_index)
    ocr_before = metric("outbox_ocr_engine_runs_total")
    embed_before = metric("outbox_embedding_texts_total")
    stop, failures, searches, arrived = threading.Event(), [], [0], []

    def search_loop() -> None:
        while not stop.is_set():
            r = api.get("/v1/search", headers=AUTH_A, params={"q": "receipt", "mode": "text"})
            searches[0] += 1
            if r.status_code != 200:
                failures.append(r.text)
            time.sleep(0.05)

    def arrivals() -> None:
        while not stop.is_set():
            arrived.append(submit_receipt(api, f"Arriving receipt {len(arrived)}"))
            time.sleep(0.5)

    threads = [threading.Thread(target=search_loop), threading.Thread(target=arrivals)]
    for t in threads:
        t.start()
    try:
        proc = _rebuild(cfg, "search", "--verify")
        out, err = proc.communicate(timeout=300)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert proc.returncode == 0, err
    summary = _summary(out)
    assert aliased_indices(es, cfg.es_index) == [summary["copy"]]
    assert summary["removed"] == old and not es.indices.exists(index=old[0])
    assert searches[0] > 10 and failures == []
    for i in arrived:
        wait_for(lambda i=i: is_searchable(api, i), what=f"{i} searchable after the rebuild")
    engine = make_engine(cfg)
    auditor = Auditor(cfg, engine, es, redis.Redis.from_url(cfg.redis_url), s3_client(cfg),
                      grace_s=0)
    assert list(auditor.view_findings()) == []  # every document at its database version
    # Only the images that arrived were read and embedded: the rebuild itself ran neither.
    assert metric("outbox_ocr_engine_runs_total") - ocr_before == len(arrived)
    assert metric("outbox_embedding_texts_total") - embed_before == len(arrived)
    engine.dispose()
    es.close()


def test_a_rebuild_killed_halfway_completes_when_run_again(cfg, pipeline, api):
    image = submit_receipt(api, "Many versions")
    wait_for(lambda: is_searchable(api, image), what="searchable")
    engine = make_engine(cfg)
    for _ in range(300):  # a long log, so the replay takes a while
        with engine.begin() as conn:
            resync(conn, load_image(conn, "org-a", uuid.UUID(image), for_update=True))
    wait_for(lambda: is_searchable(api, image), what="the live view caught up")
    es = Elasticsearch(cfg.es_url)
    live = aliased_indices(es, cfg.es_index)
    proc = _rebuild(cfg, "search")

    def unfinished() -> str | None:
        for index in es.indices.get(index=f"{cfg.es_index}-r*", ignore_unavailable=True):
            if index not in live:
                return index
        return None

    # Killed once its index exists: while its consumer group joins (seconds on this broker)
    # and before any switch, so the kill lands mid-rebuild every time.
    building = wait_for(unfinished, timeout_s=60, interval_s=0.02, what="the new index")
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    assert aliased_indices(es, cfg.es_index) == live  # never on a half-built index
    again = _rebuild(cfg, "search")
    out, err = again.communicate(timeout=300)
    assert again.returncode == 0, err
    summary = _summary(out)
    assert summary["copy"] == building  # resumed, not started over
    assert aliased_indices(es, cfg.es_index) == [building]
    assert is_searchable(api, image)
    engine.dispose()
    es.close()


def test_the_task_cache_is_rebuilt_as_a_new_generation(cfg, pipeline, api):
    image = submit_receipt(api, "Cache rebuild")
    wait_for(lambda: is_searchable(api, image), what="searchable")
    version = api.get(f"/v1/images/{image}", headers=AUTH_A).json()["version"]
    wait_for(lambda: cache_at(cfg, image, version), what="cached")  # its own projector
    before = api.get(f"/v1/images/{image}", headers=AUTH_A).json()["tasks"]
    r = redis.Redis.from_url(cfg.redis_url)
    proc = _rebuild(cfg, "cache")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert int(r.get(f"{cfg.redis_prefix}:task-generation")) >= 1
    assert r.exists(f"{cfg.redis_prefix}:task:{image}") == 0  # the old generation is gone
    time.sleep(1.1)  # readers follow the pointer within a second
    assert api.get(f"/v1/images/{image}", headers=AUTH_A).json()["tasks"] == before
    r.close()


def test_a_rebuild_with_no_live_position_reads_the_whole_log(cfg, pipeline, api):
    image = submit_receipt(api, "No live position")
    wait_for(lambda: is_searchable(api, image), what="searchable")
    es = Elasticsearch(cfg.es_url)
    rebuild = SearchRebuild(cfg, es)
    # As if the live projector had never committed (never ran, or its offsets expired):
    # its position says nothing, so the rebuild must read the log to its end.
    rebuild.live_group = f"{cfg.topic_prefix}.search.never-ran"
    summary = rebuild.run(keep_old=True)
    with make_engine(cfg).connect() as conn:
        images = conn.execute(text("select count(*) from image where state <> 'deleted'")
                              ).scalar()
    es.indices.refresh(index=summary["copy"])
    assert es.count(index=summary["copy"])["count"] == images
    es.close()
