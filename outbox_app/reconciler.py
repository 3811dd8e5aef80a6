"""The reconciler: acts on images whose state deadline has passed.

It reads only what is due, through the partial index on `deadline_at`, and repairs each
image in its own transaction with the same guarded transitions as everything else:

- `requested`: the object may exist with its confirmation lost; it is verified and the
  image moves on (`uploaded`/`ocr_pending`, or `rejected`); with no object it `expired`.
- `uploaded` without metadata: `abandoned`, and its object deleted.
- `ocr_running` (a worker died mid-attempt): a crash, not an attempt (`after_crash`): back
  to `ocr_pending`, or `ocr_failed` once OUTBOX_MAX_CRASHES crashes are spent.
- `ocr_pending`, `embedding_pending` (the request was dead-lettered, or the worker is down
  or far behind): requeued, a new version with a new deadline and event, so at most once
  per deadline period; the worker acts on the newest version only.

Overdue images are also counted (`outbox_reconciler_overdue`, and how far past its deadline
the most overdue one is), images per state (`outbox_images`), and failed rounds, for alerting.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from datetime import timedelta

import structlog
from botocore.client import BaseClient
from botocore.exceptions import ClientError
from prometheus_client import Counter as PromCounter
from prometheus_client import Gauge
from sqlalchemy import func, select, tuple_
from sqlalchemy.engine import Connection, Engine, RowMapping

from outbox_app.upload_verification import UploadMissing
from outbox_app.uploads import settle_upload
from outbox_images.policy import REQUEUE_EVENTS, ImageState, after_crash
from outbox_images.settings import ImageSettings
from outbox_images.store import requeue, transition
from outbox_images.tables import image_table, result_cache_table

log = structlog.get_logger(__name__)
S = ImageState
REPAIRABLE = (S.REQUESTED, S.UPLOADED, S.OCR_RUNNING, *REQUEUE_EVENTS)

REPAIRS = PromCounter("outbox_reconciler_repairs_total", "images repaired",
                      ["from_state", "to_state"])
OVERDUE = Gauge("outbox_reconciler_overdue", "images past their state's deadline", ["state"])
OLDEST_OVERDUE = Gauge("outbox_reconciler_oldest_overdue_seconds",
                       "how long ago the deadline of the most overdue image of each state passed",
                       ["state"])
IMAGES = Gauge("outbox_images", "images in each state", ["state"])
FAILED_ROUNDS = PromCounter("outbox_reconciler_failed_rounds_total",
                            "rounds that failed (database or S3 error); the next round retries")
LAST_SUCCESS = Gauge("outbox_reconciler_last_success_timestamp_seconds",
                     "Unix time at which the last round completed")
FAILED_CHECKS = PromCounter("outbox_reconciler_failed_checks_total",
                            "per-round checks that failed (a store unreachable); the next "
                            "round retries", ["check"])
# A per-round check (app/reconciler_checks.py): does its work if it has any, returns what it
# did by kind.
RoundCheck = Callable[[], Mapping[str, int]]
# Created at zero, so an alert's increase() also sees the first requeue of a process.
for _state in REQUEUE_EVENTS:
    REPAIRS.labels(_state.value, _state.value)


class Reconciler:
    """Repairs overdue images; `run_once` handles up to `batch` of them."""

    def __init__(self, settings: ImageSettings, engine: Engine, s3: BaseClient,
                 batch: int = 100, count_states_every_s: float = 60.0,
                 checks: Sequence[tuple[str, RoundCheck]] = ()) -> None:
        self._settings = settings
        self._engine = engine
        self._s3 = s3
        self._batch = batch
        # Counting images per state scans the whole table (74 ms for 300,000 rows here), so
        # it runs at most this often rather than every round.
        self._count_states_every_s = count_states_every_s
        self._states_counted_at: float | None = None
        self.stop = threading.Event()
        # Run after each round's deadline repairs, in order (app/reconciler_checks.py).
        self.checks = list(checks)
        self.last_run_at: float | None = None
        self.last_error: str | None = None

    def health(self) -> dict[str, object]:
        """Report for `/healthz`: `failing` while the last round failed (the process is
        alive all the same; `/readyz` checks PostgreSQL and the bucket). The error's text is
        in the log only (it can name a user or a host)."""
        return {"status": "ok" if self.last_error is None else "failing",
                "last_run_at": self.last_run_at}

    def run_once(self) -> Counter[str]:
        """Repair what is due now; return how many images went to each state."""
        t = image_table.c
        with self._engine.connect() as conn:
            due = conn.execute(
                select(t.id).where(t.deadline_at < func.now(), t.state.in_(REPAIRABLE))
                .order_by(t.deadline_at).limit(self._batch)).scalars().all()
            overdue = {state: (count, oldest) for state, count, oldest in conn.execute(
                select(t.state, func.count(),
                       func.max(func.extract("epoch", func.now() - t.deadline_at)))
                .where(t.deadline_at < func.now()).group_by(t.state)).all()}
        for state in S:
            count, oldest = overdue.get(state.value, (0, 0))
            OVERDUE.labels(state.value).set(count)
            OLDEST_OVERDUE.labels(state.value).set(float(oldest))
        outcome: Counter[str] = Counter()
        for image_id in due:
            result = self._repair_one(image_id)
            if result:
                outcome[result] += 1
        expired = self._purge_results()
        if expired:
            outcome["result_cache_purged"] += expired
        self._count_states()
        return outcome

    def _count_states(self) -> None:
        """Set `outbox_images{state}`, unless it was counted less than the interval ago."""
        now = time.monotonic()
        if (self._states_counted_at is not None
                and now - self._states_counted_at < self._count_states_every_s):
            return
        t = image_table.c
        with self._engine.connect() as conn:
            counts = dict(conn.execute(select(t.state, func.count()).group_by(t.state)).all())
        for state in S:
            IMAGES.labels(state.value).set(counts.get(state.value, 0))
        self._states_counted_at = now

    def _purge_results(self, chunk: int = 10_000) -> int:
        """Delete cached OCR/embedding results past their retention (a chunk per round)."""
        c = result_cache_table.c
        old = select(c.kind, c.checksum, c.engine).where(
            c.created_at < func.now() - timedelta(seconds=self._settings.result_cache_retention_s)
        ).limit(chunk)
        with self._engine.begin() as conn:
            return conn.execute(result_cache_table.delete().where(
                tuple_(c.kind, c.checksum, c.engine).in_(old))).rowcount

    def _repair_one(self, image_id: uuid.UUID) -> str | None:
        t = image_table.c
        with self._engine.begin() as conn:
            # Locked and re-checked: a worker or the API may have moved it meanwhile.
            row = conn.execute(
                select(image_table).where(t.id == image_id, t.deadline_at < func.now())
                .with_for_update(skip_locked=True)).mappings().one_or_none()
            if row is None or row["state"] not in REPAIRABLE:
                return None
            new = self._repair(conn, row)
        REPAIRS.labels(row["state"], new["state"]).inc()
        log.info("image_repaired", image=str(image_id), from_state=row["state"],
                 to_state=new["state"])
        return str(new["state"])

    def _repair(self, conn: Connection, row: RowMapping) -> RowMapping:
        state, settings = ImageState(row["state"]), self._settings
        if state is S.REQUESTED:
            try:
                return settle_upload(conn, self._s3, settings, row)[0]
            except UploadMissing:
                return transition(conn, row, S.EXPIRED, settings,
                                  {"last_error": "no upload before the deadline"})
        if state is S.UPLOADED:
            self._delete_object(row["object_key"])
            return transition(conn, row, S.ABANDONED, settings,
                              {"last_error": "no metadata before the deadline"})
        if state in REQUEUE_EVENTS:
            return requeue(conn, row, settings)
        # `ocr_running` past its deadline: the worker died or hung, a crash, not an attempt.
        target, changes = after_crash(row["attempts"], row["crashes"], settings)
        return transition(conn, row, target, settings, changes)

    def _delete_object(self, key: str) -> None:
        try:
            self._s3.delete_object(Bucket=self._settings.s3_bucket, Key=key)
        except ClientError as exc:  # already gone is fine; anything else retries next round
            if exc.response.get("Error", {}).get("Code") not in {"404", "NoSuchKey"}:
                raise

    def run_checks(self) -> Counter[str]:
        """Run the per-round checks; one that fails is logged and counted, the others still
        run. Return what they did by kind."""
        done: Counter[str] = Counter()
        for name, check in self.checks:
            try:
                done.update(check())
            except Exception as exc:  # a store unreachable: the next round retries
                FAILED_CHECKS.labels(name).inc()
                log.warning("reconcile_check_failed", check=name, error=str(exc)[:300])
        return done

    def run(self, interval_s: float) -> int:
        """Repair every `interval_s` until `stop` is set."""
        while not self.stop.is_set():
            try:
                done = self.run_once()
                self.last_error = None
                LAST_SUCCESS.set_to_current_time()
                if done:
                    log.info("reconciled", **done)
            except Exception as exc:  # a database or S3 hiccup: the next round retries
                FAILED_ROUNDS.inc()
                self.last_error = str(exc)[:300]
                log.warning("reconcile_failed", error=self.last_error)
            checked = self.run_checks()
            if checked:
                log.info("checked", **checked)
            self.last_run_at = time.time()
            self.stop.wait(interval_s)
        return 0
