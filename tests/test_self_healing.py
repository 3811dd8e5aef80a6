"""It heals itself. With the relay, the four projectors and the reconciler running as
processes, and nothing run by hand after the start: a document deleted straight from
Elasticsearch, a flushed Redis and a deleted live index are each healed within two audit
intervals, and `outbox audit --grace 0` then exits 0. While the search view is gone, search
answers 503 and uploads and image reads keep working."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest
import redis
from elasticsearch import Elasticsearch, NotFoundError
from fastapi.testclient import TestClient

from outbox_app.api.app import create_app
from outbox_app.sample_images import text_image
from outbox_app.views.search_index import aliased_indices
from outbox_app.views.task_cache import TaskCache
from tests.auth import AUTH_A
from tests.db_roles import APP_URL, as_app, role_url
from tests.images import upload
from tests.own_redis import OwnRedis
from tests.pipeline_harness import isolated_settings, wait_for
from tests.relay_harness import ROOT, RelayProc, free_port, settings_env

pytestmark = pytest.mark.slow

AUDIT_INTERVAL_S = 8.0
HEAL_WITHIN_S = 2 * AUDIT_INTERVAL_S


@contextmanager
def _process(args: list[str], env: dict[str, str], log: Path) -> Iterator[subprocess.Popen]:
    """`outbox <args>` as a child process, stopped by its PID (SIGTERM) afterwards."""
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "outbox.cli", *args], env=env,
                                cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
        try:
            yield proc
        finally:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(10)


def _submit(api: TestClient, title: str) -> str:
    body = text_image([title, "Total 7.10"])
    created = api.post("/v1/images", headers=AUTH_A, json={
        "filename": "h.png", "content_type": "image/png", "size": len(body),
        "metadata": {"title": title}})
    assert created.status_code == 201, created.text
    assert upload(created.json(), body).status_code in (200, 204)
    confirmed = api.post(f"/v1/images/{created.json()['id']}/uploaded", headers=AUTH_A)
    assert confirmed.status_code == 200, confirmed.text
    return created.json()["id"]


def _searchable(api: TestClient, ids: list[str]) -> bool:
    return all(api.get(f"/v1/images/{i}", headers=AUTH_A).json().get("searchable") is True
               for i in ids)


def _healed_within(what: str, healed, started: float) -> float:
    """Seconds from `started` until `healed()`; fails past two audit intervals."""
    wait_for(healed, timeout_s=HEAL_WITHIN_S - (time.monotonic() - started),
             interval_s=0.1, what=f"{what} healed within {HEAL_WITHIN_S:.0f} s")
    return time.monotonic() - started


def test_drift_and_lost_views_heal_with_nothing_run_by_hand(tmp_path):
    own = OwnRedis()
    own.start()
    # The processes (the stack) stop before the settings' resources are removed.
    with isolated_settings("heal") as owner_cfg, ExitStack() as stack:
        stack.callback(own.stop)
        cfg = owner_cfg.model_copy(update={"redis_url": f"redis://127.0.0.1:{own.port}/0"})
        env = {**os.environ, **settings_env(cfg), "OUTBOX_REDIS_URL": cfg.redis_url,
               "OUTBOX_DATABASE_URL": role_url(APP_URL),
               "OUTBOX_PROJECTOR_SESSION_TIMEOUT_MS": "6000",
               "OUTBOX_PROJECTOR_BATCH_SIZE": "50",
               "OUTBOX_RECONCILER_AUDIT_INTERVAL_S": str(AUDIT_INTERVAL_S),
               "OUTBOX_RECONCILER_AUDIT_GRACE_S": "1"}
        relay = RelayProc(cfg, "logical", tmp_path / "relay.log")
        stack.callback(relay.stop)
        for name in ("ocr", "embed", "search", "cache"):
            stack.enter_context(_process(["project", name, "--metrics-port", str(free_port())],
                                         env, tmp_path / f"{name}.log"))
        stack.enter_context(_process(["reconcile", "--interval", "1", "--metrics-port",
                                      str(free_port())], env, tmp_path / "reconcile.log"))
        api = stack.enter_context(TestClient(create_app(as_app(cfg)),
                                             raise_server_exceptions=False))
        # The shared search server can take over the client's default 10 s to answer while
        # a rebuild indexes on the same two cores; how fast it answers is not what is tested.
        es = Elasticsearch(cfg.es_url, request_timeout=60)
        stack.callback(es.close)
        client = redis.Redis.from_url(cfg.redis_url)
        stack.callback(client.close)
        tasks = TaskCache(cfg, client)
        # The reconciler's first round has seen the views born (the cache's marker written).
        wait_for(lambda: client.exists(tasks.marker_key), timeout_s=60, what="a first round")
        ids = [_submit(api, f"Healing receipt {n}") for n in range(3)]
        wait_for(lambda: _searchable(api, ids), timeout_s=240, what="the images searchable")
        healed: dict[str, float] = {}

        # A document deleted by hand: found by the continuous audit, resynced through the log.
        es.delete(index=cfg.es_index, id=ids[0], refresh=True)
        started = time.monotonic()

        def document_back() -> bool:
            try:
                es.get(index=cfg.es_index, id=ids[0])
                return True
            except NotFoundError:
                return False

        healed["document deleted"] = _healed_within("the deleted document", document_back,
                                                    started)

        # Redis flushed: every task entry and the cache's marker gone.
        client.flushall()
        started = time.monotonic()
        healed["Redis flushed"] = _healed_within(
            "the task cache", lambda: client.exists(tasks.marker_key)
            and len(TaskCache(cfg, client).versions(ids)) == len(ids), started)

        # The live index deleted: its alias goes with it.
        es.indices.delete(index=aliased_indices(es, cfg.es_index))
        started = time.monotonic()
        searched = api.get("/v1/search", headers=AUTH_A, params={"q": "receipt"})
        assert searched.status_code == 503, searched.text
        assert searched.json()["error"]["code"] == "search_unavailable"
        arrived = _submit(api, "Arrived while search was down")  # uploads keep working
        assert api.get(f"/v1/images/{ids[1]}", headers=AUTH_A).status_code == 200
        healed["live index deleted"] = _healed_within(
            "the search view", lambda: aliased_indices(es, cfg.es_index) != [], started)

        wait_for(lambda: _searchable(api, [*ids, arrived]), timeout_s=120,
                 what="every image searchable again")
        audit = subprocess.run([sys.executable, "-m", "outbox.cli", "audit", "--grace", "0",
                                "--json"], env=env, cwd=ROOT, capture_output=True, text=True,
                               timeout=120)
        assert audit.returncode == 0, audit.stdout + audit.stderr
        print(f"healed after (s): {healed}")
