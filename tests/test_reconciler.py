"""The reconciler repairs overdue images: lost confirmations, never-uploaded, abandoned,
stuck OCR attempts and requests that never reached their worker, each through a guarded
update with its event. An object uploaded after its image expired is found by the audit."""

from __future__ import annotations

import uuid

import pytest
import redis
from botocore.exceptions import ClientError
from elasticsearch import Elasticsearch
from sqlalchemy import select, text

from outbox.tables import outbox_table
from outbox_app.audit import Auditor, Repairer
from outbox_app.reconciler import Reconciler
from outbox_app.sample_images import text_image
from outbox_app.views.search_index import ensure_index
from outbox_app.workers.ocr import OcrWorker
from outbox_images.storage import s3_client
from outbox_images.store import transition
from tests.auth import AUTH_A
from tests.events import events_of
from tests.images import png_bytes, upload


@pytest.fixture
def reconciler(api_settings, engine):
    return Reconciler(api_settings, engine, s3_client(api_settings))


def _create(api, body: bytes, **extra) -> dict:
    r = api.post("/v1/images", headers=AUTH_A, json={
        "filename": "a.png", "content_type": "image/png", "size": len(body), **extra})
    assert r.status_code == 201, r.text
    return r.json()


def _overdue(engine, image_id: str) -> None:
    """Let the deadline pass without waiting for it."""
    with engine.begin() as conn:
        conn.execute(text("update image set deadline_at = now() - interval '1 second' "
                          "where id = :id"), {"id": image_id})


def _state(api, image_id: str) -> dict:
    return api.get(f"/v1/images/{image_id}", headers=AUTH_A).json()


def _events(engine, image_id: str) -> list[str]:
    with engine.connect() as conn:
        return list(conn.execute(select(outbox_table.c.type).where(
            outbox_table.c.aggregate_id == image_id).order_by(outbox_table.c.seq)).scalars())


def test_lost_confirmation_is_recovered(api, engine, reconciler):
    body = png_bytes("uploaded, never confirmed")
    created = _create(api, body, metadata={"title": "lost confirm"})
    upload(created, body)
    _overdue(engine, created["id"])
    assert reconciler.run_once() == {"ocr_pending": 1}
    assert _state(api, created["id"])["state"] == "ocr_pending"
    assert _events(engine, created["id"]) == ["image.requested", "image.uploaded",
                                             "image.ocr_requested"]


def test_never_uploaded_expires_and_not_due_is_untouched(api, engine, reconciler):
    gone = _create(api, png_bytes())
    fresh = _create(api, png_bytes())
    _overdue(engine, gone["id"])
    assert reconciler.run_once() == {"expired": 1}
    assert _state(api, gone["id"])["state"] == "expired"
    assert _state(api, fresh["id"])["state"] == "requested"
    assert reconciler.run_once() == {}


def test_upload_without_metadata_is_abandoned_and_its_object_deleted(api, engine, reconciler,
                                                                     api_settings):
    body = png_bytes()
    created = _create(api, body)
    upload(created, body)
    assert api.post(f"/v1/images/{created['id']}/uploaded", headers=AUTH_A).status_code == 200
    _overdue(engine, created["id"])
    assert reconciler.run_once() == {"abandoned": 1}
    s3 = s3_client(api_settings)
    listed = s3.list_objects_v2(Bucket=api_settings.s3_bucket,
                                Prefix=created["upload_fields"]["key"])
    assert listed.get("KeyCount", 0) == 0


@pytest.mark.parametrize(("crashes", "expected"), [(0, "ocr_pending"), (4, "ocr_failed")])
def test_stuck_ocr_attempt_is_a_crash_not_an_attempt(api, engine, reconciler, api_settings,
                                                     crashes, expected):
    body = png_bytes()
    created = _create(api, body, metadata={"title": "stuck"})
    upload(created, body)
    api.post(f"/v1/images/{created['id']}/uploaded", headers=AUTH_A)
    from outbox_images.policy import ImageState
    from outbox_images.store import load_image

    with engine.begin() as conn:  # a worker claimed it (its third attempt), then died
        row = load_image(conn, "org-a", uuid.UUID(created["id"]))
        transition(conn, row, ImageState.OCR_RUNNING, api_settings,
                   {"attempts": 3, "crashes": crashes})
    _overdue(engine, created["id"])
    assert reconciler.run_once() == {expected: 1}
    doc = _state(api, created["id"])
    # The attempt is given back; the crash budget (OUTBOX_MAX_CRASHES, 5) decides.
    assert (doc["state"], doc["attempts"], doc["crashes"]) == (expected, 2, crashes + 1)
    if expected == "ocr_failed":
        assert doc["last_error"].startswith("crashed the OCR worker 5 times")
    else:
        assert "crash 1 of 5" in doc["last_error"]


def test_overdue_ocr_request_is_requeued_and_only_the_new_one_acts(api, engine, reconciler,
                                                                    api_settings):
    body = text_image(["Requeued 88"])
    created = _create(api, body, metadata={"title": "dead-lettered request"})
    upload(created, body)
    api.post(f"/v1/images/{created['id']}/uploaded", headers=AUTH_A)
    _overdue(engine, created["id"])
    assert reconciler.run_once() == {"ocr_pending": 1}
    assert reconciler.run_once() == {}  # the new deadline is ahead
    older, newer = events_of(engine, created["id"])[-2:]
    assert (older.type, newer.type) == ("image.ocr_requested", "image.ocr_requeued")
    assert newer.aggregate_version == older.aggregate_version + 1
    worker = OcrWorker(api_settings, engine, s3_client(api_settings))
    worker.apply([older])  # the original request, arriving late: stale, nothing happens
    assert _state(api, created["id"])["state"] == "ocr_pending"
    worker.apply([newer])
    doc = _state(api, created["id"])
    assert doc["state"] == "embedding_pending" and "88" in doc["ocr"]["text"]


def test_an_object_uploaded_after_its_image_expired_is_found_and_removed(
        api, engine, reconciler, api_settings):
    body = png_bytes()
    created = _create(api, body)
    _overdue(engine, created["id"])
    assert reconciler.run_once() == {"expired": 1}
    # The presigned POST outlives the image: the object arrives after the expiry.
    assert upload(created, body).status_code in (200, 204)
    es = Elasticsearch(api_settings.es_url)
    client = redis.Redis.from_url(api_settings.redis_url)
    s3 = s3_client(api_settings)
    ensure_index(es, api_settings)
    try:
        # The bucket is shared with other tests: only this image's findings count.
        findings = [f for f in Auditor(api_settings, engine, es, client, s3,
                                       grace_s=0).findings() if f.image_id == created["id"]]
        assert [f.kind for f in findings if f.kind.startswith("object_")] == ["object_orphan"]
        findings = [f for f in findings if f.kind == "object_orphan"]
        Repairer(api_settings, engine, s3).repair(findings[0])
        with pytest.raises(ClientError):
            s3.head_object(Bucket=api_settings.s3_bucket, Key=findings[0].object_key)
    finally:
        for index in es.indices.get(index=f"{api_settings.es_index}*"):
            es.indices.delete(index=index)
        es.close()
