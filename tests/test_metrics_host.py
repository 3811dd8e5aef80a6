"""Where a process serves /metrics, /healthz and /readyz: `--metrics-host` when given, else
the `metrics_host` setting (`OUTBOX_METRICS_HOST`), 127.0.0.1 by default; and what it
exports from its first second. The processes run against addresses where nothing listens
(they serve their endpoints while they wait), so no server is needed."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import requests

from outbox.cli import build_parser
from outbox.observability import metrics_host
from outbox.settings import Settings
from tests.relay_harness import ROOT, free_port

OUTBOX = str(ROOT / ".venv/bin/outbox")
NOWHERE = {"OUTBOX_DATABASE_URL": "postgresql+psycopg://u:p@127.0.0.1:1/none",
           "OUTBOX_KAFKA_BOOTSTRAP": "127.0.0.1:1",
           "AUDIT_LOG_DATABASE_URL": "postgresql+psycopg://u:p@127.0.0.1:1/none"}


def _settings(**values: str) -> Settings:
    return Settings(database_url=NOWHERE["OUTBOX_DATABASE_URL"],
                    kafka_bootstrap=NOWHERE["OUTBOX_KAFKA_BOOTSTRAP"], **values)


def test_the_setting_defaults_to_the_loopback_and_the_command_line_wins(monkeypatch):
    monkeypatch.delenv("OUTBOX_METRICS_HOST", raising=False)
    assert _settings().metrics_host == "127.0.0.1"
    monkeypatch.setenv("OUTBOX_METRICS_HOST", "0.0.0.0")
    from_env = _settings()
    assert from_env.metrics_host == "0.0.0.0"
    assert metrics_host(None, from_env) == "0.0.0.0"
    assert metrics_host("127.0.0.5", from_env) == "127.0.0.5"


@pytest.mark.parametrize(("argv", "option"), [
    (["relay"], "metrics_host"), (["project", "audit-log"], "metrics_host"),
    (["reconcile"], "metrics_host"), (["api"], "host")])
def test_no_long_running_command_fixes_the_host_itself(argv, option):
    assert getattr(build_parser().parse_args(argv), option) is None  # the setting decides


@contextmanager
def _process(argv: list[str], env: dict[str, str]) -> Iterator[None]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("OUTBOX_", "AUDIT_LOG_"))}
    process = subprocess.Popen([OUTBOX, *argv], env={**base, **NOWHERE, **env},
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _metrics(host: str, port: int) -> str:
    """The /metrics text once the process answers on host:port (within 20 s)."""
    deadline = time.monotonic() + 20
    while True:
        try:
            return requests.get(f"http://{host}:{port}/metrics", timeout=2).text
        except requests.ConnectionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def _refused(host: str, port: int) -> bool:
    try:
        requests.get(f"http://{host}:{port}/healthz", timeout=2)
    except requests.ConnectionError:
        return True
    return False


def test_the_relay_listens_on_the_setting_and_counts_from_zero():
    port = free_port()
    with _process(["relay", "--metrics-port", str(port)],
                  {"OUTBOX_METRICS_HOST": "127.0.0.2"}):
        text = _metrics("127.0.0.2", port)
        assert _refused("127.0.0.1", port)
    for name in ("outbox_relay_publish_errors_total", "outbox_relay_dead_letters_total",
                 "outbox_relay_events_published_total", "outbox_relay_batches_total"):
        assert f'{name}{{mode="logical"}} 0.0' in text.splitlines()


def test_a_projector_listens_where_the_command_line_says_and_counts_from_zero():
    port = free_port()
    with _process(["project", "audit-log", "--metrics-port", str(port),
                   "--metrics-host", "127.0.0.3"], {"OUTBOX_METRICS_HOST": "127.0.0.2"}):
        text = _metrics("127.0.0.3", port)
        assert _refused("127.0.0.2", port)
    lines = text.splitlines()
    for name in ("outbox_projector_dead_letters_total", "outbox_projector_events_applied_total",
                 "outbox_projector_retries_total", "outbox_projector_lag_seconds"):
        assert f'{name}{{projector="audit-log"}} 0.0' in lines
