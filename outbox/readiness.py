"""Readiness: whether a process is connected to what it needs, for `/readyz`.

A probe is a cheap call to one dependency (a `select 1`, a metadata request) that raises when
the dependency does not answer. `CachedProbes` runs a process's probes side by side, answers
within `budget_s` (an orchestrator's probe times out after a second) and keeps the result
for `ttl_s`, so frequent probes never hammer the dependencies. A probe still running from an
earlier round is not started again: it reports that it has not answered yet.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Any

import psycopg
from confluent_kafka.admin import AdminClient

from outbox.kafka import make_admin
from outbox.settings import Settings

Probe = Callable[[], object]
Check = dict[str, Any]  # {"ok": bool, "error": str (when not ok), ...details}

PROBE_TIMEOUT_S = 2.0
TTL_S = 1.5
BUDGET_S = 0.8


def ok(**details: Any) -> Check:
    """A condition that holds."""
    return {"ok": True, **details}


def missing(error: str, **details: Any) -> Check:
    """A condition that does not hold, and why."""
    return {"ok": False, "error": error, **details}


def readiness_report(checks: Mapping[str, Check], **details: Any) -> dict[str, Any]:
    """`ready` (every check holds), `missing` (the names of those that do not), `checks`."""
    absent = [name for name, check in checks.items() if not check["ok"]]
    return {"ready": not absent, "missing": absent, **details, "checks": dict(checks)}


class CachedProbes:
    """Named probes run side by side within a time budget, their results cached a moment."""

    def __init__(self, probes: Mapping[str, Probe], ttl_s: float = TTL_S,
                 budget_s: float = BUDGET_S) -> None:
        self._probes = dict(probes)
        self._ttl_s = ttl_s
        self._budget_s = budget_s
        self._pool = ThreadPoolExecutor(max(1, len(self._probes)),
                                        thread_name_prefix="readiness-probe")
        self._lock = threading.Lock()
        self._running: dict[str, Future[object]] = {}
        self._results: dict[str, Check] = {}
        self._at = -float("inf")

    def results(self) -> dict[str, Check]:
        """Each probe's check: fresh, or at most `ttl_s` old."""
        with self._lock:
            if time.monotonic() - self._at < self._ttl_s:
                return dict(self._results)
            for name, probe in self._probes.items():
                if name not in self._running or self._running[name].done():
                    self._running[name] = self._pool.submit(probe)
            wait(list(self._running.values()), self._budget_s)
            self._results = {name: self._check(future)
                             for name, future in self._running.items()}
            self._at = time.monotonic()
            return dict(self._results)

    def _check(self, future: Future[object]) -> Check:
        if not future.done():
            return missing(f"no answer within {self._budget_s}s")
        exc = future.exception()
        if exc is None:
            return ok()
        return missing(f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}")


def postgres_probe(dsn: str, timeout_s: float = PROBE_TIMEOUT_S) -> Probe:
    """`select 1` on a connection of its own (a pool's connection could be the broken one
    or be busy)."""
    def probe() -> None:
        with psycopg.connect(dsn, connect_timeout=max(2, round(timeout_s))) as conn:
            conn.execute("select 1")
    return probe


def kafka_probe(settings: Settings, timeout_s: float = PROBE_TIMEOUT_S) -> Probe:
    """A metadata request to the brokers, on one client kept for the probes."""
    client: list[AdminClient] = []

    def probe() -> None:
        if not client:
            # log_level 0: librdkafka would log every failed reconnection to stderr.
            client.append(make_admin(settings, log_level=0))
        client[0].list_topics(timeout=timeout_s)
    return probe
