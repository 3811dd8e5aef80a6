"""`outbox audit` against the real stores: injected drift is reported by kind, `--repair`
heals it through the log, and a second audit is clean."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

import pytest
import redis
from elasticsearch import Elasticsearch
from fastapi.testclient import TestClient

from outbox_app.api.app import create_app
from outbox_app.sample_images import text_image
from outbox_images.storage import s3_client
from tests.auth import AUTH_A
from tests.images import upload
from tests.pipeline_harness import isolated_settings, wait_for
from tests.relay_harness import settings_env

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cfg():
    with isolated_settings("aud") as s:
        yield s


@pytest.fixture(scope="module")
def api(cfg):
    with TestClient(create_app(cfg), raise_server_exceptions=False) as client:
        yield client


def _create(api, lines: list[str], metadata: bool = True) -> str:
    body = text_image(lines)
    request = {"filename": "a.png", "content_type": "image/png", "size": len(body)}
    if metadata:
        request["metadata"] = {"title": lines[0]}
    created = api.post("/v1/images", headers=AUTH_A, json=request).json()
    assert upload(created, body).status_code in (200, 204)
    assert api.post(f"/v1/images/{created['id']}/uploaded", headers=AUTH_A).status_code == 200
    return created["id"]


def audit(cfg, *args: str) -> tuple[int, dict]:
    env = {**os.environ, **settings_env(cfg)}
    r = subprocess.run([sys.executable, "-m", "outbox.cli", "audit", "--json", "--grace", "0",
                        *args], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode in (0, 1), r.stderr
    return r.returncode, json.loads(r.stdout)


def wait_clean(cfg, what: str) -> None:
    """Until an audit is clean; the last report is in the failure message."""
    last: list[dict] = [{}]

    def clean() -> bool:
        code, last[0] = audit(cfg)
        return code == 0

    try:
        wait_for(clean, timeout_s=90, interval_s=1, what=what)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; last audit: {last[0]}") from None


def test_injected_drift_is_found_and_repaired_through_the_log(cfg, pipeline, api):
    ids = [_create(api, [f"Receipt {n}", "Total 9.99"]) for n in range(4)]
    gone = _create(api, ["To be deleted"])
    waiting = _create(api, ["No metadata yet"], metadata=False)  # stays `uploaded`
    for i in [*ids, gone]:
        wait_for(lambda i=i: api.get(f"/v1/images/{i}", headers=AUTH_A).json()["searchable"],
                 what=f"{i} searchable")
    assert api.delete(f"/v1/images/{gone}", headers=AUTH_A).status_code == 200
    es = Elasticsearch(cfg.es_url)
    wait_for(lambda: not es.exists(index=cfg.es_index, id=gone), what="deleted from the view")
    wait_clean(cfg, "a clean audit before the drift")

    # The drift, injected straight into the stores.
    es.delete(index=cfg.es_index, id=ids[0], refresh=True)
    stale = es.get(index=cfg.es_index, id=ids[1])
    es.delete(index=cfg.es_index, id=ids[1])
    es.index(index=cfg.es_index, id=ids[1], document=stale["_source"],
             version=stale["_version"] - 1, version_type="external", refresh=True)
    es.index(index=cfg.es_index, id=gone, document={"org_id": "org-a", "state": "embedded",
                                                    "version": 3}, refresh=True)
    r = redis.Redis.from_url(cfg.redis_url)
    for key in r.scan_iter(f"{cfg.redis_prefix}:*"):
        r.delete(key)
    s3 = s3_client(cfg)
    orphan_key = f"orgs/org-a/images/{uuid.uuid4()}"
    s3.put_object(Bucket=cfg.s3_bucket, Key=orphan_key, Body=b"nobody's")
    s3.delete_object(Bucket=cfg.s3_bucket, Key=f"orgs/org-a/images/{waiting}")

    code, report = audit(cfg)
    assert code == 1
    kinds = {(f["kind"], f["image_id"]) for f in report["items"]}
    assert ("view_missing", ids[0]) in kinds
    assert ("view_stale", ids[1]) in kinds
    assert ("view_orphan", gone) in kinds
    assert {("cache_missing", i) for i in ids} <= kinds
    assert ("object_orphan", orphan_key.rsplit("/", 1)[-1]) in kinds
    assert ("object_missing", waiting) in kinds

    code, repaired = audit(cfg, "--repair")
    assert code == 1 and repaired["repaired"]["object_deleted"] == 1, repaired
    assert repaired["repaired"].get("failed_missing_object") == 1, repaired
    wait_clean(cfg, "a clean audit after the repair")
    assert api.get(f"/v1/images/{waiting}", headers=AUTH_A).json()["state"] == "ocr_failed"
    assert es.get(index=cfg.es_index, id=ids[1])["_version"] > stale["_version"]
    es.close()


def test_an_unreachable_store_makes_the_audit_incomplete(cfg):
    env = {**os.environ, **settings_env(cfg), "OUTBOX_ES_URL": "http://127.0.0.1:9"}
    r = subprocess.run([sys.executable, "-m", "outbox.cli", "audit"], env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "could not complete" in r.stderr


def test_an_image_the_log_no_longer_holds_is_reported_and_resent(cfg, pipeline, api,
                                                                 monkeypatch):
    from datetime import UTC, datetime

    import outbox_app.audit as audit_module
    from outbox.db import make_engine
    from outbox_app.audit import Auditor, Repairer

    image = _create(api, ["Old receipt"])
    wait_for(lambda: api.get(f"/v1/images/{image}", headers=AUTH_A).json()["searchable"],
             what="searchable")
    cut = datetime.now(UTC)

    def deleted_records_log_floor_mock(settings):
        # Tansu has no retention and refuses DeleteRecords, so the real broker cannot be
        # made to drop old events: every partition "lost" what came before `cut`.
        return 3, dict.fromkeys(range(3), cut)

    monkeypatch.setattr(audit_module, "log_floor", deleted_records_log_floor_mock)
    engine = make_engine(cfg)
    es = Elasticsearch(cfg.es_url)
    client = redis.Redis.from_url(cfg.redis_url)
    auditor = Auditor(cfg, engine, es, client, s3_client(cfg), grace_s=0)
    gaps = [f for f in auditor.findings() if f.kind == "log_gap"]
    assert image in {f.image_id for f in gaps}
    repairer = Repairer(cfg, engine, s3_client(cfg))
    for f in gaps:
        repairer.repair(f)
    # The resync put a new event with the whole document in the log: covered again.
    wait_for(lambda: not any(f.kind == "log_gap" and f.image_id == image
                             for f in Auditor(cfg, engine, es, client, s3_client(cfg),
                                              grace_s=0).findings()),
             timeout_s=60, what="the image back in the log")
    engine.dispose()
    es.close()
