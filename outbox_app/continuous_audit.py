"""The continuous audit: the reconciler audits a bounded part of the image table every pass
and repairs drift through the log, so drift heals with no command typed.

Each pass (every `OUTBOX_RECONCILER_AUDIT_INTERVAL_S`) judges:

- the images changed since the last pass: a watermark `(updated_at, id)` walked in keyset
  order up to `now - grace`, at most `OUTBOX_RECONCILER_AUDIT_MAX_CHANGED_ROWS` of them (the
  rest next pass: the watermark only moves past what was judged);
- a slice of the rest: the next `OUTBOX_RECONCILER_AUDIT_SLICE_ROWS` ids after a cursor
  that wraps around at the end of the table, so every image is judged at least once per
  `ceil(images / slice) * interval`.

Both positions, and the pass's results, live in one row of `continuous_audit`, so a
restarted reconciler goes on where the last pass stopped. The judging and the repairs are
`outbox_app.audit`'s (`Auditor.row_findings`, `Repairer`), as `outbox audit --repair` does them:
the search view and the task cache against the rows (missing, stale, a deleted image still
in the view) and the log's coverage. Bucket drift and view documents with no row at all
need a full listing and stay with `outbox audit`.

Several reconcilers may run: a pass runs under a session-level advisory lock named after
the schema, taken with `pg_try_advisory_lock` (a reconciler that does not get it skips the
pass), and a pass starts only when the last one, by any reconciler, is an interval old. A
row lock (`SELECT ... FOR UPDATE SKIP LOCKED`) would do the same, but it keeps a transaction
with a transaction id open for the whole pass, which holds back the xmin horizon and
vacuum; the advisory lock holds no transaction, and dies with its session when the process
is killed.
"""

from __future__ import annotations

import math
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import redis
import structlog
from botocore.client import BaseClient
from elasticsearch import Elasticsearch
from prometheus_client import Counter as PromCounter
from prometheus_client import Gauge, Histogram
from sqlalchemy import func, select, text, tuple_, update
from sqlalchemy.engine import Engine

from outbox_app.audit import VIEW_KINDS, Auditor, Repairer
from outbox_app.settings import AppSettings
from outbox_images.tables import continuous_audit_table, image_table

log = structlog.get_logger(__name__)

AUDIT_NAME = "images"  # the one row of `continuous_audit` this audit keeps
LAST_ID = uuid.UUID(int=(1 << 128) - 1)  # a watermark after every id of its timestamp
# Drift of a kind found this many passes in a row needs a person (the alert's threshold
# in infra/prometheus/alerts.yaml, and `outbox status`'s).
PERSISTING_PASSES = 3

FOUND = PromCounter("outbox_reconciler_audit_findings_total",
                    "drift found by the continuous audit", ["kind"])
REPAIRED = PromCounter("outbox_reconciler_audit_repairs_total",
                       "drift the continuous audit repaired (through the log)", ["kind"])
OPEN = Gauge("outbox_reconciler_audit_open_drift",
             "drift still open: found by the latest pass; its repairs are confirmed by the "
             "next pass, which judges the repaired images again", ["kind"])
DRIFT_PASSES = Gauge("outbox_reconciler_audit_drift_passes",
                     "consecutive passes that found drift of this kind", ["kind"])
ROWS = PromCounter("outbox_reconciler_audit_rows_total",
                   "image rows judged by the continuous audit", ["part"])
PASS_SECONDS = Histogram("outbox_reconciler_audit_pass_seconds",
                         "time of one continuous-audit pass (lock, read, judge, repair)",
                         buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120))
LAST_PASS = Gauge("outbox_reconciler_audit_last_pass_timestamp_seconds",
                  "Unix time of the last completed pass, by any reconciler")
COVERAGE = Gauge("outbox_reconciler_audit_coverage_seconds",
                 "how long the last full sweep of the table by the slices took")
for _kind in VIEW_KINDS:  # at zero, so alerts and increase() see the first finding
    FOUND.labels(_kind)
    REPAIRED.labels(_kind)
    OPEN.labels(_kind).set(0)
    DRIFT_PASSES.labels(_kind).set(0)


@dataclass(frozen=True)
class Cursor:
    """Where the audit stands: the watermark of changed rows, the slice cursor, and the
    results of the last pass (the durable row of `continuous_audit`)."""

    watermark_at: datetime | None = None
    watermark_id: uuid.UUID | None = None
    slice_after: uuid.UUID | None = None
    cycle_started_at: datetime | None = None
    last_cycle_s: float | None = None
    last_pass_at: datetime | None = None
    last_pass_s: float | None = None
    last_pass_rows: int = 0
    passes: int = 0
    open_drift: dict[str, int] | None = None
    drift_passes: dict[str, int] | None = None


@dataclass(frozen=True)
class PassPlan:
    """What one pass reads: changed rows after `changed_after` up to `upto`, and the slice
    of ids after `slice_after`."""

    changed_after: tuple[datetime, uuid.UUID]
    upto: datetime
    changed_limit: int
    slice_after: uuid.UUID | None
    slice_limit: int


def is_due(cursor: Cursor, now: datetime, interval_s: float) -> bool:
    """Whether a pass should run now (the last pass, by any reconciler, is an interval
    old)."""
    return cursor.last_pass_at is None or now - cursor.last_pass_at >= timedelta(
        seconds=interval_s)


def plan_pass(cursor: Cursor, now: datetime, *, grace_s: float, interval_s: float,
              slice_rows: int, max_changed_rows: int) -> PassPlan:
    """The rows of the next pass. Rows changed within `grace_s` are left to a later pass
    (their events may still be on the way); a first pass starts its watermark one interval
    back (the slices cover what is older)."""
    upto = now - timedelta(seconds=grace_s)
    if cursor.watermark_at is None:
        after = (upto - timedelta(seconds=interval_s), LAST_ID)
    else:
        after = (cursor.watermark_at, cursor.watermark_id or LAST_ID)
    return PassPlan(after, upto, max_changed_rows, cursor.slice_after, slice_rows)


def advance(cursor: Cursor, plan: PassPlan, now: datetime, *,
            changed: Sequence[tuple[datetime, uuid.UUID]], slice_ids: Sequence[uuid.UUID]
            ) -> Cursor:
    """The cursor after a pass judged `changed` (its changed rows' keys, in order) and
    `slice_ids` (in order). A full page of changed rows moves the watermark to the last one
    judged, a short page to `upto`; a short slice wraps the cursor around and closes a
    sweep of the table (timed from its first slice to its last)."""
    full = len(changed) >= plan.changed_limit
    watermark = changed[-1] if full else (plan.upto, LAST_ID)
    started = cursor.cycle_started_at if plan.slice_after is not None else None
    started = started or now
    last_cycle_s = cursor.last_cycle_s
    slice_after: uuid.UUID | None = slice_ids[-1] if slice_ids else None
    if len(slice_ids) < plan.slice_limit:  # the end of the table: the next slice starts over
        last_cycle_s = (now - started).total_seconds()
        slice_after = started = None
    return replace(cursor, watermark_at=watermark[0], watermark_id=watermark[1],
                   slice_after=slice_after, cycle_started_at=started,
                   last_cycle_s=last_cycle_s)


def record_results(cursor: Cursor, found: Counter[str], now: datetime, seconds: float,
                   rows: int) -> Cursor:
    """The cursor with a pass's results: what it found by kind, and how many passes in a
    row found each kind."""
    before = cursor.drift_passes or {}
    return replace(cursor, last_pass_at=now, last_pass_s=round(seconds, 3),
                   last_pass_rows=rows, passes=cursor.passes + 1,
                   open_drift={k: n for k, n in found.items() if n},
                   drift_passes={k: before.get(k, 0) + 1 for k, n in found.items() if n})


def coverage_period_s(images: int, slice_rows: int, interval_s: float) -> float:
    """The longest time before an unchanged image is judged again: one sweep of the table
    in slices, one per interval."""
    return max(1, math.ceil(images / slice_rows)) * interval_s


def audit_lock_name(schema: str) -> str:
    """The advisory lock one pass of a schema's continuous audit holds."""
    return f"outbox-audit:{schema}"


class ContinuousAudit:
    """One pass when due (`run_due`), for the reconciler's loop."""

    def __init__(self, settings: AppSettings, engine: Engine, es: Elasticsearch,
                 client: redis.Redis, s3: BaseClient) -> None:
        self._settings = settings
        self._engine = engine
        self._es = es
        self._redis = client
        self._s3 = s3

    def run_due(self) -> Counter[str]:
        """Run a pass if one is due and no other reconciler runs one; return what it found
        and repaired (empty when no pass ran). The gauges follow the durable results either
        way, so every reconciler exports the same state."""
        lock = {"n": audit_lock_name(self._settings.db_schema)}
        with self._engine.connect().execution_options(isolation_level="AUTOCOMMIT") as held:
            got = held.execute(text("select pg_try_advisory_lock(hashtextextended(:n, 0))"),
                               lock).scalar()
            try:
                cursor, now = self._load()
                if not got or not is_due(cursor, now,
                                         self._settings.reconciler_audit_interval_s):
                    publish(cursor)
                    return Counter()
                return self._pass(cursor, now)
            finally:
                # A pooled connection keeps session locks: released here (a broken session
                # has lost it already).
                if got:
                    held.execute(text("select pg_advisory_unlock(hashtextextended(:n, 0))"),
                                 lock)

    def _load(self) -> tuple[Cursor, datetime]:
        c = continuous_audit_table.c
        with self._engine.connect() as conn:
            row = conn.execute(select(continuous_audit_table, func.now().label("now"))
                               .where(c.name == AUDIT_NAME)).mappings().one()
        fields = {k: row[k] for k in Cursor.__dataclass_fields__}
        return Cursor(**fields), row["now"]

    def _pass(self, cursor: Cursor, now: datetime) -> Counter[str]:
        started = time.perf_counter()
        s = self._settings
        plan = plan_pass(cursor, now, grace_s=s.reconciler_audit_grace_s,
                         interval_s=s.reconciler_audit_interval_s,
                         slice_rows=s.reconciler_audit_slice_rows,
                         max_changed_rows=s.reconciler_audit_max_changed_rows)
        changed, sliced = self._read(plan)
        judged = {r.id: r for r in changed}
        # A slice row changed after `upto` is not settled: the changed rows of a later pass.
        judged.update({r.id: r for r in sliced if r.id not in judged and r.updated_at <= plan.upto})
        ROWS.labels("changed").inc(len(changed))
        ROWS.labels("slice").inc(len(sliced))
        # The window is settled by the database's clock already, so no grace is applied again.
        auditor = Auditor(s, self._engine, self._es, self._redis, self._s3, grace_s=0)
        repairer = Repairer(s, self._engine, self._s3)
        found: Counter[str] = Counter()
        repaired: Counter[str] = Counter()
        for finding in auditor.row_findings(list(judged.values())):
            found[finding.kind] += 1
            repairer.repair(finding)
            repaired[finding.kind] += 1
        after = advance(cursor, plan, now, changed=[(r.updated_at, r.id) for r in changed],
                        slice_ids=[r.id for r in sliced])
        seconds = time.perf_counter() - started
        after = record_results(after, found, now, seconds, len(judged))
        self._store(after)
        for kind, n in found.items():
            FOUND.labels(kind).inc(n)
        for kind, n in repaired.items():
            REPAIRED.labels(kind).inc(n)
        PASS_SECONDS.observe(seconds)
        publish(after)
        log.info("audit_pass", rows=len(judged), changed=len(changed), slice=len(sliced),
                 seconds=round(seconds, 3), found=dict(found), repaired=dict(repairer.done),
                 wrapped=after.slice_after is None)
        return Counter({f"audit_{k}": n for k, n in found.items()})

    def _read(self, plan: PassPlan) -> tuple[list[Any], list[Any]]:
        t = image_table.c
        cols = [t.id, t.org_id, t.state, t.version, t.updated_at]
        changed = (select(*cols)
                   .where(tuple_(t.updated_at, t.id) > tuple_(*plan.changed_after),
                          t.updated_at <= plan.upto)
                   .order_by(t.updated_at, t.id).limit(plan.changed_limit))
        sliced = select(*cols).order_by(t.id).limit(plan.slice_limit)
        if plan.slice_after is not None:
            sliced = sliced.where(t.id > plan.slice_after)
        with self._engine.connect() as conn:
            return conn.execute(changed).all(), conn.execute(sliced).all()

    def _store(self, cursor: Cursor) -> None:
        values = {k: getattr(cursor, k) for k in Cursor.__dataclass_fields__}
        with self._engine.begin() as conn:
            conn.execute(update(continuous_audit_table)
                         .where(continuous_audit_table.c.name == AUDIT_NAME).values(**values))


def publish(cursor: Cursor) -> None:
    """Set the gauges from the durable results of the last pass."""
    open_drift, passes = cursor.open_drift or {}, cursor.drift_passes or {}
    for kind in {*VIEW_KINDS, *open_drift, *passes}:
        OPEN.labels(kind).set(open_drift.get(kind, 0))
        DRIFT_PASSES.labels(kind).set(passes.get(kind, 0))
    if cursor.last_pass_at is not None:
        LAST_PASS.set(cursor.last_pass_at.timestamp())
    if cursor.last_cycle_s is not None:
        COVERAGE.set(cursor.last_cycle_s)


def audit_summary(engine: Engine) -> dict[str, Any] | None:
    """The continuous audit's last pass, for `outbox status` (None before the first)."""
    c = continuous_audit_table.c
    with engine.connect() as conn:
        row = conn.execute(select(continuous_audit_table).where(c.name == AUDIT_NAME)
                           ).mappings().one_or_none()
    if row is None or row["last_pass_at"] is None:
        return None
    return {"last_pass_at": _utc(row["last_pass_at"]), "last_pass_s": row["last_pass_s"],
            "rows": row["last_pass_rows"], "passes": row["passes"],
            "open": dict(row["open_drift"] or {}), "drift_passes": dict(row["drift_passes"] or {}),
            "last_sweep_s": row["last_cycle_s"], "watermark_at": _utc(row["watermark_at"])}


def _utc(value: datetime | None) -> str | None:
    return None if value is None else value.astimezone(UTC).isoformat()


def persisting(summary: dict[str, Any] | None) -> Iterator[str]:
    """Attention lines: drift found in `PERSISTING_PASSES` passes in a row."""
    for kind, passes in sorted(((summary or {}).get("drift_passes") or {}).items()):
        if passes >= PERSISTING_PASSES:
            yield (f"continuous audit: {kind} found in {passes} passes in a row "
                   f"({summary['open'].get(kind, 0)} open at the last); `outbox audit` lists "
                   "them")
