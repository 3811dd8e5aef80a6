"""The reconciler's metrics that the alert rules read: images per state, overdue images and
how far past their deadline, failed rounds and the time of the last good round."""

from __future__ import annotations

import threading
import time

from prometheus_client import REGISTRY
from sqlalchemy import text

from outbox.db import make_engine
from outbox_app.reconciler import Reconciler
from outbox_images.policy import REQUEUE_EVENTS, ImageState
from outbox_images.storage import s3_client
from tests.auth import AUTH_A
from tests.images import png_bytes
from tests.pipeline_harness import metric


def _create(api) -> str:
    body = png_bytes()
    r = api.post("/v1/images", headers=AUTH_A, json={
        "filename": "a.png", "content_type": "image/png", "size": len(body)})
    assert r.status_code == 201, r.text
    return r.json()["id"]


def _run_one_round(rec: Reconciler) -> None:
    """`run` (the loop the process runs) for exactly one round."""
    thread = threading.Thread(target=rec.run, args=(60.0,), daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while rec.last_run_at is None and time.monotonic() < deadline:
        time.sleep(0.02)
    rec.stop.set()
    thread.join(10)
    assert rec.last_run_at is not None, "the round did not finish"


def test_images_per_state_and_overdue_age(api, engine, api_settings):
    _create(api)  # not due: counted as `requested`, left alone
    late, later = _create(api), _create(api)
    with engine.begin() as conn:
        conn.execute(text("update image set deadline_at = now() - interval '2 hours' "
                          "where id = :id"), {"id": late})
        # Not repairable: only counted, and its age is what an alert would see growing.
        conn.execute(text("update image set state = 'ocr_done', "
                          "deadline_at = now() - interval '1 hour' where id = :id"),
                     {"id": later})
    rec = Reconciler(api_settings, engine, s3_client(api_settings))
    assert rec.run_once() == {"expired": 1}

    assert metric("outbox_reconciler_overdue", state="requested") == 1
    assert 7200 <= metric("outbox_reconciler_oldest_overdue_seconds", state="requested") < 7260
    assert metric("outbox_reconciler_overdue", state="ocr_done") == 1
    assert 3600 <= metric("outbox_reconciler_oldest_overdue_seconds", state="ocr_done") < 3660
    assert metric("outbox_reconciler_overdue", state="uploaded") == 0
    assert metric("outbox_reconciler_oldest_overdue_seconds", state="uploaded") == 0
    # Counted after the repairs: the expired image is already `expired`.
    expected = {"requested": 1, "expired": 1, "ocr_done": 1}
    assert {s.value: metric("outbox_images", state=s.value) for s in ImageState} == {
        s.value: expected.get(s.value, 0) for s in ImageState}


def test_states_are_counted_at_most_every_interval(api, engine, api_settings):
    _create(api)
    rec = Reconciler(api_settings, engine, s3_client(api_settings), count_states_every_s=3600)
    rec.run_once()
    assert metric("outbox_images", state="requested") == 1
    _create(api)
    rec.run_once()
    assert metric("outbox_images", state="requested") == 1  # not counted again yet
    Reconciler(api_settings, engine, s3_client(api_settings)).run_once()
    assert metric("outbox_images", state="requested") == 2


def test_a_failed_round_is_counted_and_a_good_one_timestamped(settings, engine, api_settings):
    # A schema that does not exist: a real "relation does not exist" error from PostgreSQL,
    # as after a deploy that skipped the migrations.
    unmigrated = settings.model_copy(update={"db_schema": f"{settings.db_schema}_missing"})
    bad_engine = make_engine(unmigrated)
    failed_before = metric("outbox_reconciler_failed_rounds_total")
    good_before = metric("outbox_reconciler_last_success_timestamp_seconds")
    bad = Reconciler(unmigrated, bad_engine, s3_client(settings))
    _run_one_round(bad)
    bad_engine.dispose()
    assert metric("outbox_reconciler_failed_rounds_total") == failed_before + 1
    assert metric("outbox_reconciler_last_success_timestamp_seconds") == good_before
    assert bad.health()["status"] == "failing"

    started = time.time()
    good = Reconciler(api_settings, engine, s3_client(api_settings))
    _run_one_round(good)
    assert metric("outbox_reconciler_failed_rounds_total") == failed_before + 1
    assert started <= metric("outbox_reconciler_last_success_timestamp_seconds") <= time.time()
    assert good.health()["status"] == "ok"


def test_requeue_series_exist_before_the_first_requeue():
    """An alert's increase() sees a series' first step only when the series existed before."""
    for state in REQUEUE_EVENTS:
        labels = {"from_state": state.value, "to_state": state.value}
        assert REGISTRY.get_sample_value("outbox_reconciler_repairs_total", labels) is not None
