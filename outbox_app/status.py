"""An operator's snapshot of the pipeline, for one org or all of them: the services, the
relay's position and lag, each projector's lag and throughput, the images per state, the
overdue and failed images, the dead letters, and what of it needs attention.

`outbox status` prints it and `GET /v1/status` (the status page) serves it for the caller's
org. The pipeline-wide part (services, relay, projectors, dead-letter topics) is the same
for every org; images and dead letters are counted for the org asked about.
"""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
from sqlalchemy import func, select
from sqlalchemy.engine import Engine

from outbox.readiness import CachedProbes, kafka_probe
from outbox_app.continuous_audit import audit_summary, persisting
from outbox_app.log_positions import ThroughputMeter, committed_totals, log_positions
from outbox_app.settings import AppSettings
from outbox_app.sink_probes import store_probes
from outbox_images.policy import RETRYABLE, ImageState
from outbox_images.tables import image_table
from relays.admin import relay_status

SERVICES = ("database", "kafka", "search", "redis", "s3")
FAILED_STATES = tuple(RETRYABLE)  # the failures an operator acts on (`outbox retry`)
RECENT = timedelta(minutes=1)


class StatusIncomplete(RuntimeError):
    """The status cannot be told: the installation's tables are missing (not migrated)."""


def service_probes(settings: AppSettings, budget_s: float = 2.5) -> CachedProbes:
    """The readiness probes of every service the pipeline needs (`outbox.readiness`), run
    side by side; one that has not answered within `budget_s` is reported as down."""
    probes = store_probes(settings, ("database", "search", "redis", "s3"))
    return CachedProbes({**probes, "kafka": kafka_probe(settings)}, ttl_s=0.0,
                        budget_s=budget_s)


def _said(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc)[:200]}"


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.astimezone(UTC).isoformat()


def image_summary(engine: Engine, org: str | None, limit: int = 20) -> dict[str, Any]:
    """Images per state (with how many entered it in the last minute), the overdue ones
    (state deadline passed) and the failed ones with their errors, the first `limit` of
    each listed. Every query reads `org`'s rows only, or every org's when None."""
    t = image_table.c
    scope = [] if org is None else [t.org_id == org]
    now = func.now()
    overdue_s = func.extract("epoch", now - t.deadline_at)
    with engine.connect() as conn:
        per_state = {row.state: row for row in conn.execute(
            select(t.state, func.count().label("n"),
                   func.count().filter(t.state_entered_at > now - RECENT).label("recent"),
                   func.count().filter(t.deadline_at < now).label("overdue"))
            .where(*scope).group_by(t.state))}
        overdue = conn.execute(
            select(t.id, t.org_id, t.state, t.deadline_at, overdue_s.label("overdue_s"))
            .where(t.deadline_at < now, *scope).order_by(t.deadline_at).limit(limit)).all()
        failed = conn.execute(
            select(t.id, t.org_id, t.state, t.attempts, t.last_error, t.updated_at)
            .where(t.state.in_(FAILED_STATES), *scope)
            .order_by(t.updated_at.desc()).limit(limit)).all()
    overdue_by_state = {s: row.overdue for s, row in per_state.items() if row.overdue}
    failed_by_state = {s.value: per_state[s.value].n for s in FAILED_STATES
                       if s.value in per_state}
    return {
        "images": [{"state": s.value, "count": row.n if row else 0,
                    "entered_last_minute": row.recent if row else 0}
                   for s in ImageState for row in [per_state.get(s.value)]],
        "overdue": {"count": sum(overdue_by_state.values()), "by_state": overdue_by_state,
                    "items": [{"id": str(r.id), "org_id": r.org_id, "state": r.state,
                               "deadline_at": _iso(r.deadline_at),
                               "overdue_s": round(float(r.overdue_s), 1)} for r in overdue]},
        "failures": {"count": sum(failed_by_state.values()), "by_state": failed_by_state,
                     "items": [{"id": str(r.id), "org_id": r.org_id, "state": r.state,
                                "attempts": r.attempts, "error": r.last_error,
                                "at": _iso(r.updated_at)} for r in failed]},
    }


def relay_summary(settings: AppSettings) -> dict[str, Any]:
    """The relay's position and lag, from `relays.admin.relay_status` (what `outbox relay
    status` shows), without the leader's connection details."""
    status = relay_status(settings)
    slot, ack = status["slot"] or {}, status["acknowledged"] or {}
    waiting = status["unpublished_estimate"]
    oldest = waiting["oldest_s"]
    return {"slot": slot.get("slot_name"), "wal_status": slot.get("wal_status"),
            "acked_lsn": ack.get("acked_lsn"),
            "acked_commit_at": _iso(ack.get("acked_commit_at")),
            "lag_bytes": slot.get("lag_bytes"),
            "retained_wal_bytes": slot.get("retained_wal_bytes"),
            "waiting_events": waiting["rows"],
            "oldest_waiting_s": None if oldest is None else round(float(oldest), 1),
            "leader": status["leader"] is not None, "problems": status["problems"]}


def _letters_of(dead_letters: list[dict[str, Any]], org: str | None) -> list[dict[str, Any]]:
    """Dead letters per topic, counting only `org`'s (an undecodable letter has no org and
    is counted for all orgs only)."""
    out = []
    for d in dead_letters:
        mine = [replayed for o, replayed in d["letters"] if org is None or o == org]
        out.append({"topic": d["topic"], "letters": len(mine),
                    "not_replayed": mine.count(False), "counted_all": d["complete"]})
    return out


def attention(report: dict[str, Any], max_lag_s: float) -> list[str]:
    """What needs a person, one line each: a service down, a relay problem or lag, a
    projector lag over `max_lag_s`, overdue or failed images, dead letters not replayed, and
    any part that could not be read."""
    found = [f"{s['name']} unreachable: {s['error']}" for s in report["services"] if not s["ok"]]
    found += [f"{part} could not be read: {why}" for part, why in report["unavailable"].items()]
    relay = report["relay"]
    if relay is not None:
        found += [f"relay: {p}" for p in relay["problems"]]
        if (relay["oldest_waiting_s"] or 0) > max_lag_s:
            found.append(f"relay: the oldest unpublished event waits "
                         f"{relay['oldest_waiting_s']:.0f} s (over {max_lag_s:g} s)")
    for p in report["projectors"] or []:
        if (p["oldest_waiting_s"] or 0) > max_lag_s:
            found.append(f"projector {p['name']}: {'at least ' if p['behind_at_least'] else ''}"
                         f"{p['behind']} events behind, the oldest waiting "
                         f"{p['oldest_waiting_s']:.0f} s (over {max_lag_s:g} s)")
    if report["overdue"] and report["overdue"]["count"]:
        found.append(f"images past their state deadline: {report['overdue']['count']} "
                     f"{_counts(report['overdue']['by_state'])}")
    if report["failures"] and report["failures"]["count"]:
        found.append(f"failed images: {report['failures']['count']} "
                     f"{_counts(report['failures']['by_state'])}, `outbox retry` once fixed")
    for d in report["dead_letters"] or []:
        if d["not_replayed"]:
            found.append(f"dead letters not replayed in {d['topic']}: {d['not_replayed']}")
    found += persisting(report.get("continuous_audit"))
    return found


def _counts(by_state: dict[str, int]) -> str:
    return "(" + ", ".join(f"{state} {n}" for state, n in sorted(by_state.items())) + ")"


class StatusCollector:
    """Gathers snapshots; keeps the throughput samples between them, and the pipeline-wide
    part for `pipeline_ttl_s` (so many pages refreshing at once read the log once)."""

    def __init__(self, settings: AppSettings, engine: Engine, *,
                 pipeline_ttl_s: float = 0.0) -> None:
        self._settings = settings
        self._engine = engine
        self._ttl = pipeline_ttl_s
        self._probes = service_probes(settings)
        self.meter = ThroughputMeter()
        self._lock = threading.Lock()
        self._cached: tuple[float, dict[str, Any]] | None = None

    def sample_throughput(self) -> None:
        """Record the projectors' committed offsets now: a snapshot taken later measures
        their throughput from here."""
        for group, offsets in committed_totals(self._settings).items():
            self.meter.observe(group, sum(offsets.values()))

    def pipeline(self) -> dict[str, Any]:
        """Services, relay, projectors and dead-letter topics (shared by every org). Raises
        StatusIncomplete when the outbox tables do not exist."""
        with self._lock:
            if self._cached and time.monotonic() - self._cached[0] < self._ttl:
                return self._cached[1]
            checks = self._probes.results()
            services = [{"name": n, "ok": checks[n]["ok"], "error": checks[n].get("error")}
                        for n in SERVICES]
            up = {s["name"] for s in services if s["ok"]}
            unavailable: dict[str, str] = {}
            relay = positions = None
            if "database" in up:
                try:
                    relay = relay_summary(self._settings)
                except psycopg.errors.UndefinedTable as exc:
                    raise StatusIncomplete(_not_migrated(self._settings)) from exc
                except psycopg.Error as exc:
                    unavailable["relay"] = _said(exc)
            if "kafka" in up:
                try:
                    positions = log_positions(self._settings, self.meter)
                except Exception as exc:  # the broker failing mid-read: say so, go on
                    unavailable["log positions"] = _said(exc)
            part = {"services": services, "relay": relay, "unavailable": unavailable,
                    "projectors": positions and positions["projectors"],
                    "dead_letters": positions and positions["dead_letters"]}
            self._cached = (time.monotonic(), part)
            return part

    def snapshot(self, org: str | None = None, *, max_lag_s: float = 60.0,
                 limit: int = 20) -> dict[str, Any]:
        """The status for `org` (None: every org), with `attention` (what needs a person)
        and `healthy` (nothing does). Raises StatusIncomplete when the tables are missing."""
        pipe = self.pipeline()
        report: dict[str, Any] = {
            "generated_at": datetime.now(UTC).isoformat(), "org": org,
            "schema": self._settings.db_schema, "max_lag_s": max_lag_s,
            "services": pipe["services"], "relay": pipe["relay"],
            "projectors": pipe["projectors"],
            "dead_letters": None if pipe["dead_letters"] is None
            else _letters_of(pipe["dead_letters"], org),
            "images": None, "overdue": None, "failures": None, "continuous_audit": None,
            "unavailable": dict(pipe["unavailable"]),
        }
        if any(s["ok"] for s in pipe["services"] if s["name"] == "database"):
            try:
                report.update(image_summary(self._engine, org, limit))
            except Exception as exc:  # the database failing mid-query: say so, go on
                if isinstance(getattr(exc, "orig", None), psycopg.errors.UndefinedTable):
                    raise StatusIncomplete(_not_migrated(self._settings)) from exc
                report["unavailable"]["images"] = _said(exc)
            try:  # every org's: counts by kind only
                report["continuous_audit"] = audit_summary(self._engine)
            except Exception as exc:  # the database failing mid-query: say so, go on
                report["unavailable"]["continuous audit"] = _said(exc)
        report["attention"] = attention(report, max_lag_s)
        report["healthy"] = not report["attention"]
        return report


def _not_migrated(settings: AppSettings) -> str:
    return (f"the outbox tables do not exist in schema {settings.db_schema!r} "
            "(run `outbox migrate`)")
