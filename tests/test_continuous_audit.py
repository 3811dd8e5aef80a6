"""The continuous audit against the real stores: the reconciler's loop finds a document
deleted from the search view and a task-cache hash deleted from Redis and heals both
through the log with no command typed; several reconcilers never run a pass together, so
each drifted image is repaired once."""

from __future__ import annotations

import threading
from collections import Counter

import pytest
import redis
from elasticsearch import Elasticsearch
from fastapi.testclient import TestClient
from sqlalchemy import text

from outbox.db import make_engine
from outbox_app.api.app import create_app
from outbox_app.continuous_audit import ContinuousAudit, audit_lock_name, audit_summary
from outbox_app.reconciler import Reconciler
from outbox_app.views.search_index import ensure_index
from outbox_app.views.task_cache import TaskCache
from outbox_images.storage import s3_client
from tests.auth import AUTH_A
from tests.db_roles import as_app
from tests.events import events_of
from tests.images import submit_receipt
from tests.pipeline_harness import isolated_settings, metric, wait_for
from tests.test_audit import wait_clean

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cfg():
    # Short enough for a test, with the grace longer than the pipeline takes to apply a
    # repair, so a repaired image is judged again only once its event has arrived.
    with isolated_settings("cau") as s:
        yield s.model_copy(update={"reconciler_audit_interval_s": 1.0,
                                   "reconciler_audit_grace_s": 4.0})


@pytest.fixture(scope="module")
def cfg_api(cfg):
    with TestClient(create_app(as_app(cfg)), raise_server_exceptions=False) as client:
        yield client


def _resyncs(engine, image_id: str) -> int:
    return sum(e.type == "image.resynced" for e in events_of(engine, image_id))


def _settled(api, tasks: TaskCache, image_id: str) -> bool:
    """Embedded, and both views hold its last version: the search projector and the cache
    projector read the topic apart, so the one being done says nothing of the other."""
    image = api.get(f"/v1/images/{image_id}", headers=AUTH_A).json()
    return (image["state"] == "embedded" and image["searchable"]
            and tasks.versions([image_id]).get(image_id) == image["version"])


def test_the_reconciler_heals_drift_in_the_view_and_the_cache_by_itself(cfg, pipeline,
                                                                         cfg_api):
    es = Elasticsearch(cfg.es_url)
    client = redis.Redis.from_url(cfg.redis_url)
    tasks = TaskCache(cfg, client)
    ids = [submit_receipt(cfg_api, f"Receipt {n}") for n in range(3)]
    for i in ids:  # at the end of its journey: no event of it is on the way
        wait_for(lambda i=i: _settled(cfg_api, tasks, i),
                 what=f"{i} embedded, searchable and in the task cache")
    found = {k: metric("outbox_reconciler_audit_findings_total", kind=k)
             for k in ("view_missing", "cache_missing")}
    repaired = metric("outbox_reconciler_audit_repairs_total", kind="view_missing")

    app_cfg = as_app(cfg)
    engine = make_engine(app_cfg)
    # The reconciler's loop with the continuous audit as its only check (the lost-view
    # check of app/reconciler_checks.py is tested on its own).
    audit = ContinuousAudit(app_cfg, engine, es, client, s3_client(cfg))
    rec = Reconciler(app_cfg, engine, s3_client(cfg), checks=[("continuous_audit", audit.run_due)])
    loop = threading.Thread(target=rec.run, args=(0.5,), daemon=True)
    loop.start()
    try:
        # The drift, straight into the stores, while the reconciler runs.
        es.delete(index=cfg.es_index, id=ids[0], refresh=True)
        client.delete(tasks.key(ids[1]))
        wait_for(lambda: es.exists(index=cfg.es_index, id=ids[0]), timeout_s=60,
                 what="the deleted document back in the view")
        wait_for(lambda: tasks.versions([ids[1]]), timeout_s=60,
                 what="the deleted task-cache entry back")
        assert metric("outbox_reconciler_audit_findings_total",
                      kind="view_missing") >= found["view_missing"] + 1
        assert metric("outbox_reconciler_audit_findings_total",
                      kind="cache_missing") >= found["cache_missing"] + 1
        assert metric("outbox_reconciler_audit_repairs_total",
                      kind="view_missing") >= repaired + 1
        # Healed: a later pass judges the repaired images again and finds nothing.
        passes = audit_summary(engine)["passes"]
        wait_for(lambda: audit_summary(engine)["passes"] >= passes + 2
                 and not audit_summary(engine)["open"], timeout_s=60,
                 what="a pass that finds no drift")
    finally:
        rec.stop.set()
        loop.join(30)
    assert metric("outbox_reconciler_audit_open_drift", kind="view_missing") == 0
    assert metric("outbox_reconciler_audit_pass_seconds_count") >= 2
    owner = make_engine(cfg)
    # Each drifted image repaired by one event; the others not touched.
    assert [_resyncs(owner, i) for i in ids] == [1, 1, 0]
    owner.dispose()
    engine.dispose()
    es.close()
    client.close()
    wait_clean(cfg, "a clean audit after the reconciler's repairs")


@pytest.fixture
def drifted(migrated, api):
    """Three images the views have never seen (no relay runs): each is view_missing and
    cache_missing to an audit with no grace."""
    created = []
    for n in range(3):
        r = api.post("/v1/images", headers=AUTH_A, json={
            "filename": f"{n}.png", "content_type": "image/png", "size": 100})
        assert r.status_code == 201, r.text
        created.append(r.json()["id"])
    es = Elasticsearch(migrated.es_url)
    ensure_index(es, migrated)
    es.close()
    return created


def _audits(settings, n: int) -> list[ContinuousAudit]:
    s = as_app(settings).model_copy(update={"reconciler_audit_interval_s": 300.0,
                                            "reconciler_audit_grace_s": 0.0})
    return [ContinuousAudit(s, make_engine(s), Elasticsearch(s.es_url),
                            redis.Redis.from_url(s.redis_url), s3_client(s)) for _ in range(n)]


def test_two_reconcilers_at_once_run_one_pass_and_repair_each_image_once(migrated, engine,
                                                                          drifted):
    first, second = _audits(migrated, 2)
    start = threading.Barrier(2)
    results: list[Counter[str]] = []

    def run(audit: ContinuousAudit) -> None:
        start.wait()
        results.append(audit.run_due())

    threads = [threading.Thread(target=run, args=(a,)) for a in (first, second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(sum(r.values()) for r in results) == [0, 6], results
    assert [_resyncs(engine, i) for i in drifted] == [1, 1, 1]
    # Not due again for an interval, whichever reconciler asks.
    assert first.run_due() == Counter() and second.run_due() == Counter()
    assert [_resyncs(engine, i) for i in drifted] == [1, 1, 1]
    summary = audit_summary(engine)
    assert summary["passes"] == 1
    assert summary["open"] == {"view_missing": 3, "cache_missing": 3}


def test_a_pass_is_skipped_while_another_holds_the_lock(migrated, engine, drifted):
    (audit,) = _audits(migrated, 1)
    name = {"n": audit_lock_name(migrated.db_schema)}
    with engine.connect() as other:
        assert other.execute(text("select pg_try_advisory_lock(hashtextextended(:n, 0))"),
                             name).scalar()
        assert audit.run_due() == Counter()
        assert [_resyncs(engine, i) for i in drifted] == [0, 0, 0]
        other.execute(text("select pg_advisory_unlock(hashtextextended(:n, 0))"), name)
    assert audit.run_due() == Counter({"audit_view_missing": 3, "audit_cache_missing": 3})
    assert [_resyncs(engine, i) for i in drifted] == [1, 1, 1]
