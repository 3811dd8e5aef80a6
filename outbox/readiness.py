"""Readiness: whether a process is connected to what it needs, for `/readyz`.

A probe is a cheap call to one dependency (a `select 1`, a metadata request) that raises when
the dependency does not answer. `CachedProbes` runs a process's probes side by side, answers
within `budget_s` (an orchestrator's probe times out after a second) and keeps the result
for `ttl_s`, so frequent probes never hammer the dependencies. A probe still running from an
earlier round is not started again: it reports that it has not answered yet.

A check is `{"ok": bool, "code": short code, "error": what happened}` (code and error only
when it does not hold). The error text may name a user, a host or a file, so it stays in the
process: `PublishedReadiness` turns a report into what `/readyz` answers (each component's
`status` and `code`, no text) and logs each change of a component's state once, with the
text.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Any

import psycopg
import structlog
from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient

from outbox.kafka import make_admin
from outbox.settings import Settings

Probe = Callable[[], object]
Check = dict[str, Any]  # {"ok": bool, "code" and "error" (when not ok), ...details}

PROBE_TIMEOUT_S = 2.0
TTL_S = 1.5
BUDGET_S = 0.8
# SQLSTATEs of a refused login: wrong password, no such role or no pg_hba entry.
_AUTH_SQLSTATES = {"28P01", "28000"}
_S3_CODES = {"403": "auth_failed", "AccessDenied": "auth_failed",
             "InvalidAccessKeyId": "auth_failed", "SignatureDoesNotMatch": "auth_failed",
             "404": "not_found", "NoSuchBucket": "not_found"}

log = structlog.get_logger(__name__)


def ok(**details: Any) -> Check:
    """A condition that holds."""
    return {"ok": True, **details}


def missing(code: str, error: str = "", **details: Any) -> Check:
    """A condition that does not hold: `code` for machines (shown), `error` for people (logged
    only)."""
    return {"ok": False, "code": code, "error": error or code, **details}


def failure_code(exc: BaseException) -> str:
    """A short code for why a call to a dependency failed, without its message: `auth_failed`,
    `timeout`, `unreachable`, `not_found` or `error`."""
    if isinstance(exc, psycopg.OperationalError):
        text = str(exc)
        if exc.sqlstate in _AUTH_SQLSTATES or "authentication failed" in text:
            return "auth_failed"
        return "timeout" if "timeout expired" in text else "unreachable"
    response = getattr(exc, "response", None)  # botocore's ClientError
    if isinstance(response, dict) and response.get("Error", {}).get("Code") in _S3_CODES:
        return _S3_CODES[response["Error"]["Code"]]
    names = [cls.__name__ for cls in type(exc).__mro__]
    for part, code in (("Auth", "auth_failed"), ("Timeout", "timeout"),
                       ("NotFound", "not_found"), ("NoSuchBucket", "not_found"),
                       ("Connection", "unreachable")):
        if any(part in name for name in names):
            return code
    # A failed metadata request, a refused or reset socket: the other end does not answer.
    return "unreachable" if isinstance(exc, KafkaException | OSError) else "error"


def readiness_report(checks: Mapping[str, Check], *, optional: Iterable[str] = (),
                     **details: Any) -> dict[str, Any]:
    """`ready` while every check not in `optional` holds; `status` is `ready`, `degraded` (an
    optional one does not hold: the process serves without it) or `not_ready`; `missing` and
    `degraded` name the checks that do not hold; `checks` holds each one."""
    optional = set(optional)
    down = [name for name, check in checks.items() if not check["ok"]]
    absent = [name for name in down if name not in optional]
    degraded = [name for name in down if name in optional]
    status = "not_ready" if absent else "degraded" if degraded else "ready"
    return {"status": status, "ready": not absent, "missing": absent, "degraded": degraded,
            **details, "checks": dict(checks)}


def public_check(check: Check) -> Check:
    """What `/readyz` shows of a check: `status` up or down, the `code` when down, and its
    details (never the error text)."""
    shown = {k: v for k, v in check.items() if k not in {"ok", "code", "error"}}
    if check["ok"]:
        return {"status": "up", **shown}
    return {"status": "down", "code": check.get("code", "error"), **shown}


class PublishedReadiness:
    """Turns readiness reports into `/readyz` bodies and logs each component's change of
    state once (not once per probe), with the error text the body leaves out."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seen: dict[str, tuple[bool, str | None]] = {}

    def publish(self, report: Mapping[str, Any]) -> dict[str, Any]:
        """The body for `/readyz`: `report` with each check as `public_check` shows it."""
        checks: Mapping[str, Check] = report.get("checks", {})
        self._log_changes(checks)
        body = dict(report)
        if "checks" in report:
            body["checks"] = {name: public_check(check) for name, check in checks.items()}
        return body

    def _log_changes(self, checks: Mapping[str, Check]) -> None:
        with self._lock:
            for name, check in checks.items():
                state = (bool(check["ok"]), check.get("code"))
                before = self._seen.get(name)
                self._seen[name] = state
                if before == state or (before is None and check["ok"]):
                    continue  # unchanged, or up from the start: nothing to say
                if check["ok"]:
                    log.info("readiness_check_up", check=name)
                else:
                    log.warning("readiness_check_down", check=name, code=check.get("code"),
                                error=check.get("error"))


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
            return missing("timeout", f"no answer within {self._budget_s}s")
        exc = future.exception()
        if exc is None:
            return ok()
        return missing(failure_code(exc),
                       f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}")


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
