"""Liveness (`/healthz`) and readiness (`/readyz`) of every long-running process, against the
real services. A dependency is made unreachable without touching the shared servers: the
process reaches it through a proxy that is cut, or is given a port nothing listens on."""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import elasticsearch
import psycopg
import pytest
import redis
import requests
import structlog
from botocore.exceptions import ClientError, EndpointConnectionError
from confluent_kafka import KafkaError, KafkaException
from fastapi.testclient import TestClient
from sqlalchemy import make_url

from outbox.db import libpq_dsn
from outbox.observability import ObservabilityServer, serve_until_stopped
from outbox.pg_names import slot_name
from outbox.readiness import (
    CachedProbes,
    PublishedReadiness,
    failure_code,
    missing,
    ok,
    readiness_report,
)
from outbox_app.api.app import create_app
from outbox_app.views.task_cache import TaskCache, TaskCacheProjector
from projectors.runtime import ConsumerRuntime
from relays.runner import STALL_S, RelayProcess
from tests.auth import AUTH_A
from tests.db_roles import APP_URL, as_app, role_url
from tests.faults.proxies import CuttableTcpProxy
from tests.images import png_bytes, upload
from tests.pipeline_harness import isolated_settings, wait_for
from tests.relay_harness import ROOT, RelayProc, free_port, settings_env

pytestmark = pytest.mark.slow


def probe(port: int, path: str) -> tuple[int, dict] | None:
    """Status code and JSON body of GET path on 127.0.0.1:port (None while nothing answers)."""
    try:
        r = requests.get(f"http://127.0.0.1:{port}{path}", timeout=3)
    except requests.RequestException:
        return None
    return r.status_code, r.json()


def ready(port: int) -> dict | None:
    """The readiness report when the process says it is ready."""
    got = probe(port, "/readyz")
    return got[1] if got and got[0] == 200 and got[1]["ready"] else None


def not_ready(port: int, missing: str) -> dict | None:
    """The readiness report when the process answers 503 naming `missing`."""
    got = probe(port, "/readyz")
    return got[1] if got and got[0] == 503 and missing in got[1]["missing"] else None


def _slot_active(cfg) -> bool:
    with psycopg.connect(libpq_dsn(cfg)) as conn:
        row = conn.execute("select active from pg_replication_slots where slot_name = %s",
                           (slot_name(cfg.db_schema),)).fetchone()
    return bool(row and row[0])


def assert_alive(port: int) -> dict:
    """Liveness holds (200) whatever the dependencies do; returns the health report."""
    got = probe(port, "/healthz")
    assert got is not None and got[0] == 200, got
    return got[1]


@contextmanager
def command(args: list[str], env: dict[str, str], log: Path) -> Iterator[subprocess.Popen]:
    """`outbox <args>` as a child process, killed by its PID afterwards."""
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "outbox.cli", *args], env=env, cwd=ROOT,
                                stdout=out, stderr=subprocess.STDOUT)
        try:
            yield proc
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)


def test_cached_probes_answer_within_their_budget_and_spare_the_dependencies():
    calls = {"fast": 0, "slow": 0}
    release = threading.Event()

    def fast() -> None:
        calls["fast"] += 1

    def slow() -> None:
        calls["slow"] += 1
        release.wait(5)

    def broken() -> None:
        raise ConnectionError("refused\n  twice")

    probes = CachedProbes({"fast": fast, "slow": slow, "broken": broken}, ttl_s=0.5,
                          budget_s=0.2)
    started = time.monotonic()
    first = probes.results()
    assert time.monotonic() - started < 1.0  # the slow probe does not hold the answer
    assert first["fast"] == {"ok": True}
    assert first["slow"] == {"ok": False, "code": "timeout", "error": "no answer within 0.2s"}
    assert first["broken"] == {"ok": False, "code": "unreachable",
                               "error": "ConnectionError: refused twice"}
    assert probes.results() == first and calls == {"fast": 1, "slow": 1}  # cached
    time.sleep(0.6)
    probes.results()
    assert calls == {"fast": 2, "slow": 1}  # a probe still running is not started again
    release.set()
    time.sleep(0.6)
    assert probes.results()["slow"] == {"ok": True}


def test_healthz_is_liveness_and_readyz_decides_by_the_report():
    state = {"unlive": None, "ready": False}
    server = ObservabilityServer(
        "127.0.0.1", 0, lambda: {"status": "failing"},
        ready=lambda: {"ready": state["ready"], "missing": [] if state["ready"] else ["broker"]},
        unlive=lambda: state["unlive"])
    server.start()
    try:
        # A failing dependency is no reason for a restart: alive, the report unchanged.
        assert probe(server.port, "/healthz") == (200, {"status": "failing"})
        assert probe(server.port, "/readyz") == (503, {"ready": False, "missing": ["broker"]})
        state["ready"] = True
        assert probe(server.port, "/readyz") == (200, {"ready": True, "missing": []})
        state["unlive"] = "stopping"
        assert probe(server.port, "/healthz") == (
            503, {"status": "failing", "live": False, "reason": "stopping"})
    finally:
        server.stop()


def test_a_stopping_process_is_neither_alive_nor_ready():
    stop, port, seen = threading.Event(), free_port(), {}

    def run() -> int:  # the process's work: it answers, then a stop is requested meanwhile
        wait_for(lambda: probe(port, "/readyz"), timeout_s=10, interval_s=0.05, what="served")
        seen["before"] = probe(port, "/readyz"), probe(port, "/healthz")
        stop.set()
        seen["after"] = probe(port, "/readyz"), probe(port, "/healthz")
        return 0

    ready = {"ready": True, "missing": [], "checks": {"database": {"ok": True}}}
    shown = {"ready": True, "missing": [], "checks": {"database": {"status": "up"}}}
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    try:  # it takes SIGTERM and SIGINT for the process: given back to pytest afterwards
        assert serve_until_stopped(stop, lambda: {"status": "ok"}, "127.0.0.1", port, run,
                                   ready=lambda: ready) == 0
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)
    assert seen["before"] == ((200, shown), (200, {"status": "ok"}))
    (ready_code, ready_body), (live_code, live_body) = seen["after"]
    assert (ready_code, ready_body["missing"], ready_body["status"]) == (
        503, ["running"], "not_ready")
    assert ready_body["checks"]["running"] == {"status": "down", "code": "stopping"}
    assert (live_code, live_body["reason"]) == (503, "stopping")


def test_a_stalled_loop_fails_liveness_and_a_relay_says_why_it_does_not_publish(api_settings):
    relay = RelayProcess(api_settings, "logical")
    assert relay.stalled() is None
    relay._loop_at -= STALL_S + 1  # neither the loop nor a producer moved since
    assert relay.stalled().startswith("no progress for")
    relay.leader = True
    assert relay.readiness()["checks"]["slot"] == {"ok": False, "code": "starting",
                                                   "error": "being set up"}
    relay.publishing = True
    assert relay.readiness()["checks"]["slot"] == {"ok": True}
    relay.failing_since, relay.last_error = 5.0, "broker down"
    assert relay.readiness()["checks"]["slot"] == {
        "ok": False, "code": "failing", "error": "failing since 5: broker down"}
    relay.problem, relay.last_error = "schema_mismatch", "no column seq"
    assert relay.readiness()["missing"] == ["slot"]
    assert relay.readiness()["checks"]["slot"] == {
        "ok": False, "code": "schema_mismatch", "error": "schema_mismatch: no column seq"}

    client = redis.Redis.from_url(api_settings.redis_url)
    runtime = ConsumerRuntime(api_settings,
                              TaskCacheProjector(TaskCache(api_settings, client), client))
    assert runtime.stalled() is None
    runtime._loop_at -= api_settings.projector_max_poll_interval_ms / 1000 + 1
    assert runtime.stalled().startswith("no poll for")


def test_relay_ready_when_connected_and_not_while_the_database_is_unreachable(tmp_path):
    with isolated_settings("rdy") as cfg:
        url = make_url(cfg.database_url)
        proxy = CuttableTcpProxy(url.port or 5432)
        through_proxy = url.set(host="127.0.0.1", port=proxy.port).render_as_string(
            hide_password=False)
        cfg = cfg.model_copy(update={"relay_lock_poll_s": 0.3, "relay_heartbeat_s": 0.5})
        first = RelayProc(cfg, "logical", tmp_path / "first.log",
                          OUTBOX_DATABASE_URL=through_proxy)
        second = None
        try:
            report = wait_for(lambda: ready(first.port), timeout_s=60, what="first ready")
            assert report["role"] == "leader"
            assert report["checks"]["slot"] == {"status": "up"}
            assert set(report["checks"]) == {"database", "broker", "slot"}
            second = RelayProc(cfg, "logical", tmp_path / "second.log")
            report = wait_for(lambda: ready(second.port), timeout_s=60, what="standby ready")
            assert report["role"] == "standby" and "slot" not in report["checks"]

            proxy.cut()
            report = wait_for(lambda: not_ready(first.port, "database"), timeout_s=30,
                              what="first not ready")
            # A short code, not the driver's message (which names the host and the user).
            assert report["checks"]["database"] in ({"status": "down", "code": "unreachable"},
                                                    {"status": "down", "code": "timeout"})
            assert report["checks"]["broker"] == {"status": "up"}
            assert_alive(first.port)

            proxy.restore()
            wait_for(lambda: ready(first.port), timeout_s=30, what="first ready again")
            assert_alive(first.port)
        finally:
            first.stop()
            if second is not None:
                second.stop()
            proxy.close()
            # The proxied walsender ends a moment after its client: then the slot can go.
            wait_for(lambda: not _slot_active(cfg), timeout_s=30, what="the slot released")


def test_projector_ready_when_joined_and_not_while_its_store_or_broker_is_unreachable(tmp_path):
    with isolated_settings("rdy") as cfg:
        es = make_url(cfg.es_url)
        proxy = CuttableTcpProxy(es.port or 9200)
        env = {**os.environ, **settings_env(cfg), "OUTBOX_PROJECTOR_SESSION_TIMEOUT_MS": "6000"}
        search_port, cache_port = free_port(), free_port()
        search_env = {**env, "OUTBOX_ES_URL": proxy.url}
        # The cache projector's broker is a port nothing listens on: the process waits.
        cache_env = {**env, "OUTBOX_KAFKA_BOOTSTRAP": f"127.0.0.1:{free_port()}"}
        with command(["project", "search", "--metrics-port", str(search_port)], search_env,
                     tmp_path / "search.log"), \
                command(["project", "cache", "--metrics-port", str(cache_port)], cache_env,
                        tmp_path / "cache.log") as cache:
            try:
                report = wait_for(lambda: ready(search_port), timeout_s=60,
                                  what="search projector ready")
                assert set(report["checks"]) == {"broker", "search", "redis", "group",
                                                 "sink_writes"}
                assert report["projector"] == "search"

                proxy.cut()
                report = wait_for(lambda: not_ready(search_port, "search"), timeout_s=30,
                                  what="search projector not ready")
                assert report["missing"] == ["search"]
                assert_alive(search_port)
                proxy.restore()
                wait_for(lambda: ready(search_port), timeout_s=30, what="ready again")

                report = wait_for(lambda: not_ready(cache_port, "broker"), timeout_s=30,
                                  what="cache projector not ready")
                assert set(report["missing"]) == {"broker", "group"}
                assert report["checks"]["redis"] == {"status": "up"}
                assert assert_alive(cache_port)["status"] == "ok"
                assert cache.poll() is None  # waiting for the broker, not exited
            finally:
                proxy.close()


def test_reconciler_ready_when_connected_and_not_while_the_bucket_is_unreachable(tmp_path):
    with isolated_settings("rdy") as cfg:
        proxy = CuttableTcpProxy(make_url(cfg.s3_endpoint or "").port or 443)
        env = {**os.environ, **settings_env(cfg), "OUTBOX_S3_ENDPOINT": proxy.url}
        port = free_port()
        with command(["reconcile", "--interval", "1", "--metrics-port", str(port)], env,
                     tmp_path / "reconcile.log"):
            try:
                report = wait_for(lambda: ready(port), timeout_s=60, what="reconciler ready")
                assert set(report["checks"]) == {"database", "s3"}
                proxy.cut()
                report = wait_for(lambda: not_ready(port, "s3"), timeout_s=30,
                                  what="reconciler not ready")
                assert report["missing"] == ["s3"]
                assert_alive(port)
            finally:
                proxy.close()


def test_a_failure_is_told_by_a_short_code():
    """Real exceptions of each client, as their servers raise them, each to one code."""
    cases = [
        (psycopg.OperationalError('connection failed: connection to server at "10.0.0.5", '
                                  'port 5432 failed: FATAL:  password authentication failed '
                                  'for user "outbox_app"'), "auth_failed"),
        (psycopg.OperationalError('connection failed: connection to server at "10.0.0.5", '
                                  'port 5432 failed: Connection refused'), "unreachable"),
        (psycopg.OperationalError("connection timeout expired"), "timeout"),
        (redis.ConnectionError("Error 111 connecting to 10.0.0.5:6379. Connection refused."),
         "unreachable"),
        (redis.AuthenticationError("invalid username-password pair"), "auth_failed"),
        (redis.TimeoutError("Timeout reading from socket"), "timeout"),
        (elasticsearch.ConnectionError("Connection refused"), "unreachable"),
        (elasticsearch.ConnectionTimeout("timed out"), "timeout"),
        (EndpointConnectionError(endpoint_url="http://10.0.0.5:8333/b"), "unreachable"),
        (ClientError({"Error": {"Code": "403"}}, "HeadBucket"), "auth_failed"),
        (ClientError({"Error": {"Code": "404"}}, "HeadBucket"), "not_found"),
        (KafkaException(KafkaError(KafkaError._TRANSPORT)), "unreachable"),
        (ConnectionResetError("reset by peer"), "unreachable"),
        (ValueError("unexpected answer"), "error"),
    ]
    assert [failure_code(exc) for exc, _ in cases] == [code for _, code in cases]


def test_readyz_shows_codes_only_and_logs_each_change_once():
    reason = 'password authentication failed for user "outbox_app" (host 10.0.0.5)'
    published = PublishedReadiness()
    degraded = readiness_report(
        {"database": ok(), "search": missing("auth_failed", reason), "redis": ok()},
        optional=("search", "redis"), role="api")
    healed = readiness_report({"database": ok(), "search": ok(), "redis": ok()},
                              optional=("search", "redis"), role="api")
    with structlog.testing.capture_logs() as logs:
        bodies = [published.publish(degraded) for _ in range(3)]
        assert published.publish(healed)["status"] == "ready"
    assert bodies[0] == bodies[2] == {
        "status": "degraded", "ready": True, "missing": [], "degraded": ["search"],
        "role": "api", "checks": {"database": {"status": "up"},
                                  "search": {"status": "down", "code": "auth_failed"},
                                  "redis": {"status": "up"}}}
    assert "outbox_app" not in json.dumps(bodies) and "10.0.0.5" not in json.dumps(bodies)
    # Once when it went down (with the reason), once when it came back: not per probe.
    assert [(e["event"], e["check"]) for e in logs] == [
        ("readiness_check_down", "search"), ("readiness_check_up", "search")]
    assert (logs[0]["code"], logs[0]["error"]) == ("auth_failed", reason)

    down = readiness_report({"database": missing("unreachable", "refused"), "search": ok()},
                            optional=("search",))
    assert (down["status"], down["ready"], down["missing"], down["degraded"]) == (
        "not_ready", False, ["database"], [])


def test_api_ready_while_its_stores_answer(api_settings):
    app = create_app(as_app(api_settings))
    with TestClient(app) as api:
        r = api.get("/readyz")
        assert r.status_code == 200, r.text
        assert r.json() == {"status": "ready", "ready": True, "missing": [], "degraded": [],
                            "checks": {name: {"status": "up"}
                                       for name in ("database", "search", "redis")}}
    app.state.ctx.engine.dispose()


@contextmanager
def api_process(env: dict[str, str], log: Path) -> Iterator[int]:
    """`outbox api` as a process on a free port; yields the port once it answers."""
    port = free_port()
    with command(["api", "--host", "127.0.0.1", "--port", str(port)], env, log):
        wait_for(lambda: probe(port, "/healthz"), timeout_s=60, interval_s=0.2,
                 what="the API answers")
        yield port


def test_api_takes_uploads_and_serves_reads_while_search_and_redis_are_down(tmp_path):
    with isolated_settings("rdy") as cfg:
        closed = free_port()  # nothing listens there: both stores are unreachable
        env = {**os.environ, **settings_env(cfg), "OUTBOX_DATABASE_URL": role_url(APP_URL),
               "OUTBOX_ES_URL": f"http://127.0.0.1:{closed}",
               "OUTBOX_REDIS_URL": f"redis://127.0.0.1:{closed}/0"}
        expected = {"status": "degraded", "ready": True, "missing": [],
                    "degraded": ["search", "redis"],
                    "checks": {"database": {"status": "up"},
                               "search": {"status": "down", "code": "unreachable"},
                               "redis": {"status": "down", "code": "unreachable"}}}
        with api_process(env, tmp_path / "api.log") as port:
            base = f"http://127.0.0.1:{port}"
            # A probe's first connection may take longer than the answer's budget on a busy
            # machine (reported as `timeout`): wait for the settled state.
            wait_for(lambda: probe(port, "/readyz") == (200, expected), timeout_s=30,
                     what="ready, degraded by search and redis")
            assert requests.get(f"{base}/healthz", timeout=5).json() == {"status": "ok"}

            body = png_bytes("outage")
            created = requests.post(f"{base}/v1/images", headers=AUTH_A, timeout=10, json={
                "filename": "outage.png", "content_type": "image/png", "size": len(body)})
            assert created.status_code == 201, created.text
            image_id = created.json()["id"]
            assert upload(created.json(), body).status_code in (200, 204)
            confirmed = requests.post(f"{base}/v1/images/{image_id}/uploaded",
                                      headers=AUTH_A, timeout=10)
            assert confirmed.status_code == 200, confirmed.text
            assert confirmed.json()["state"] == "uploaded"

            got = requests.get(f"{base}/v1/images/{image_id}", headers=AUTH_A, timeout=30)
            assert got.status_code == 200, got.text
            view = got.json()
            assert (view["state"], view["version"]) == ("uploaded", confirmed.json()["version"])
            assert view["unavailable"] == ["task_cache"] and view["tasks"] is None
            assert view["searchable"] is False  # not known to be indexed

            found = requests.get(f"{base}/v1/search", headers=AUTH_A, timeout=30,
                                 params={"q": "outage", "mode": "text"})
            assert found.status_code == 503, found.text
            assert found.json()["error"]["code"] == "search_unavailable"


def test_api_without_its_database_is_not_ready_and_says_so_without_secrets(tmp_path):
    password = secrets.token_hex(12)
    url = make_url(role_url(APP_URL)).set(password=password)
    env = {**os.environ, "OUTBOX_DATABASE_URL": url.render_as_string(hide_password=False)}
    log = tmp_path / "api.log"
    expected = {"status": "not_ready", "ready": False, "missing": ["database"],
                "degraded": [],
                "checks": {"database": {"status": "down", "code": "auth_failed"},
                           "search": {"status": "up"}, "redis": {"status": "up"}}}
    with api_process(env, log) as port:
        base = f"http://127.0.0.1:{port}"
        wait_for(lambda: probe(port, "/readyz") == (503, expected), timeout_s=30,
                 what="not ready: the database refuses the login")
        r = requests.get(f"{base}/readyz", timeout=5)
        for secret in (password, url.username, url.host, "authentication", "FATAL"):
            assert secret not in r.text, secret
        assert requests.get(f"{base}/healthz", timeout=5).json() == {"status": "ok"}
        # The reason is in the log, once, for whoever runs the process.
        for _ in range(3):
            requests.get(f"{base}/readyz", timeout=5)
            time.sleep(0.6)
        lines = [json.loads(line) for line in log.read_text().splitlines()
                 if '"readiness_check_down"' in line]
        refused = [e for e in lines if (e["check"], e["code"]) == ("database", "auth_failed")]
        assert len(refused) == 1, lines
        assert "password authentication failed" in refused[0]["error"]
        assert password not in log.read_text()
