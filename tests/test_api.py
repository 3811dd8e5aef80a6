"""The upload lifecycle through HTTP, with real presigned uploads to S3."""

from __future__ import annotations

import base64
import hashlib
import threading
import uuid

import pytest
from sqlalchemy import func, select

from outbox.tables import outbox_table
from outbox_images.storage import s3_client
from outbox_images.tables import image_table
from tests.auth import AUTH_A, AUTH_B
from tests.images import png_bytes, upload

META = {"title": "Harbour receipt", "description": "line one\nline two", "tags": ["receipt"],
        "language": "en"}


def _create(api, body: bytes, **extra) -> dict:
    r = api.post("/v1/images", headers=AUTH_A, json={
        "filename": "receipt.png", "content_type": "image/png", "size": len(body), **extra})
    assert r.status_code == 201, r.text
    return r.json()


def _event_types(engine, image_id) -> list[str]:
    with engine.connect() as conn:
        return list(conn.execute(
            select(outbox_table.c.type).where(outbox_table.c.aggregate_id == str(image_id))
            .order_by(outbox_table.c.seq)).scalars())


def _table_counts(engine) -> tuple[int, int]:
    with engine.connect() as conn:
        return tuple(conn.execute(select(func.count()).select_from(t)).scalar_one()
                     for t in (image_table, outbox_table))


def _assert_error(r, status: int, code: str) -> None:
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == code, r.text
    assert r.json()["error"]["message"]


def test_happy_path_upload_first(api, engine):
    body = png_bytes("upload first")
    created = _create(api, body, checksum_sha256=hashlib.sha256(body).hexdigest())
    assert created["state"] == "requested" and created["upload_method"] == "POST"
    assert created["upload_fields"]["key"].endswith(created["id"])
    assert "receipt" not in created["upload_fields"]["key"]
    assert upload(created, body).status_code in (200, 204)
    r = api.post(f"/v1/images/{created['id']}/uploaded", headers=AUTH_A)
    assert r.status_code == 200, r.text
    assert (r.json()["state"], r.json()["object_size"]) == ("uploaded", len(body))
    again = api.post(f"/v1/images/{created['id']}/uploaded", headers=AUTH_A)
    assert again.status_code == 200 and again.json()["version"] == r.json()["version"]
    r = api.put(f"/v1/images/{created['id']}/metadata", headers=AUTH_A, json=META)
    assert r.status_code == 200, r.text
    assert r.json()["state"] == "ocr_pending" and r.json()["metadata"] == META
    assert _event_types(engine, created["id"]) == [
        "image.requested", "image.uploaded", "image.metadata_updated", "image.ocr_requested"]


def test_happy_path_metadata_first(api, engine):
    body = png_bytes("metadata first")
    created = _create(api, body)
    r = api.put(f"/v1/images/{created['id']}/metadata", headers=AUTH_A, json=META)
    assert r.status_code == 200 and r.json()["state"] == "requested"
    assert upload(created, body).status_code in (200, 204)
    r = api.post(f"/v1/images/{created['id']}/uploaded", headers=AUTH_A)
    assert r.status_code == 200 and r.json()["state"] == "ocr_pending", r.text
    got = api.get(f"/v1/images/{created['id']}", headers=AUTH_A)
    assert got.json()["version"] == 4 and got.headers["etag"] == '"4"'
    assert _event_types(engine, created["id"]) == [
        "image.requested", "image.metadata_updated", "image.uploaded", "image.ocr_requested"]


def test_metadata_given_at_creation_goes_straight_to_ocr_pending(api, engine):
    body = png_bytes("inline")
    created = _create(api, body, metadata={"title": "inline"})
    upload(created, body)
    r = api.post(f"/v1/images/{created['id']}/uploaded", headers=AUTH_A)
    assert r.json()["state"] == "ocr_pending"


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer nope"},
                                     {"Authorization": "Basic a2V5LWE="}])
def test_unknown_or_missing_key_is_401(api, engine, headers):
    r = api.post("/v1/images", headers=headers, json={
        "filename": "a.png", "content_type": "image/png", "size": 10})
    _assert_error(r, 401, "unauthorized")
    assert _table_counts(engine) == (0, 0)


def test_another_orgs_image_is_invisible(api, engine):
    created = _create(api, png_bytes())
    for method, path in [("GET", ""), ("DELETE", ""), ("POST", "/uploaded")]:
        r = api.request(method, f"/v1/images/{created['id']}{path}", headers=AUTH_B)
        _assert_error(r, 404, "not_found")
    r = api.put(f"/v1/images/{created['id']}/metadata", headers=AUTH_B, json=META)
    _assert_error(r, 404, "not_found")
    assert api.get("/v1/images", headers=AUTH_B).json()["items"] == []
    assert _table_counts(engine) == (1, 1)


@pytest.mark.parametrize(("body", "status", "code"), [
    ({"filename": "a.png", "content_type": "image/png", "size": 10**9}, 413, "too_large"),
    ({"filename": "a.gif", "content_type": "image/gif", "size": 10}, 415,
     "unsupported_media_type"),
    ({"filename": "../etc/passwd", "content_type": "image/png", "size": 10}, 422,
     "invalid_request"),
    ({"filename": "a\\b.png", "content_type": "image/png", "size": 10}, 422, "invalid_request"),
    ({"filename": "a\x00.png", "content_type": "image/png", "size": 10}, 422, "invalid_request"),
    ({"filename": "a.png", "content_type": "image/png", "size": 0}, 422, "invalid_request"),
    ({"filename": "a.png", "content_type": "image/png", "size": 10,
      "metadata": {"title": "x" * 201}}, 422, "invalid_request"),
    ({"filename": "a.png", "content_type": "image/png", "size": 10, "extra": 1}, 422,
     "invalid_request"),
])
def test_bad_creation_requests_write_nothing(api, engine, body, status, code):
    _assert_error(api.post("/v1/images", headers=AUTH_A, json=body), status, code)
    assert _table_counts(engine) == (0, 0)


def test_malformed_json_is_400(api, engine):
    r = api.post("/v1/images", headers={**AUTH_A, "Content-Type": "application/json"},
                 content=b'{"filename": ')
    _assert_error(r, 400, "malformed_json")
    assert _table_counts(engine) == (0, 0)


@pytest.mark.parametrize("meta", [
    {"title": ""},
    {"title": "x" * 201},
    {"title": "bell\x07"},
    {"title": "ok", "description": "x" * 5001},
    {"title": "ok", "description": "esc\x1b[31m"},
    {"title": "ok", "tags": ["t"] * 33},
    {"title": "ok", "tags": ["a\nb"]},
    {"title": "ok", "language": "english!"},
    {"title": "ok", "unknown": 1},
])
def test_invalid_metadata_is_422_and_writes_nothing(api, engine, meta):
    created = _create(api, png_bytes())
    r = api.put(f"/v1/images/{created['id']}/metadata", headers=AUTH_A, json=meta)
    _assert_error(r, 422, "invalid_request")
    assert _event_types(engine, created["id"]) == ["image.requested"]


def test_confirm_before_upload_is_409_and_writes_nothing(api, engine):
    created = _create(api, png_bytes())
    _assert_error(api.post(f"/v1/images/{created['id']}/uploaded", headers=AUTH_A), 409,
                  "upload_missing")
    assert _event_types(engine, created["id"]) == ["image.requested"]


def test_actual_oversize_is_refused_by_storage(api, api_settings):
    created = _create(api, b"x")
    too_big = b"\x89PNG\r\n\x1a\n" + b"0" * api_settings.max_upload_bytes
    r = upload(created, too_big)
    assert r.status_code == 400 and "EntityTooLarge" in r.text
    _assert_error(api.post(f"/v1/images/{created['id']}/uploaded", headers=AUTH_A), 409,
                  "upload_missing")


def test_wrong_content_type_is_refused_by_storage(api):
    created = _create(api, png_bytes())
    fields = {**created["upload_fields"], "Content-Type": "text/html"}
    r = upload({**created, "upload_fields": fields}, png_bytes())
    assert r.status_code == 403


def _object_exists(settings, key: str) -> bool:
    s3 = s3_client(settings)
    return s3.list_objects_v2(Bucket=settings.s3_bucket, Prefix=key).get("KeyCount", 0) > 0


@pytest.mark.parametrize("body", [
    b"<html>not an image</html>",
    b"\x89PNG\r\n\x1a\n" + b"\x00garbage" * 50,  # a PNG signature, then no image
    png_bytes()[:200],  # a real PNG, cut short
], ids=["html", "png-signature-then-garbage", "truncated-png"])
def test_non_image_bytes_are_rejected_and_deleted(api, engine, api_settings, body):
    created = _create(api, body)
    assert upload(created, body).status_code in (200, 204)
    key = created["upload_fields"]["key"]
    assert _object_exists(api_settings, key)
    _assert_error(api.post(f"/v1/images/{created['id']}/uploaded", headers=AUTH_A), 415,
                  "not_an_image")
    got = api.get(f"/v1/images/{created['id']}", headers=AUTH_A).json()
    assert got["state"] == "rejected" and got["last_error"].startswith("not_an_image")
    assert not _object_exists(api_settings, key)
    assert _event_types(engine, created["id"]) == ["image.requested", "image.upload_rejected"]
    _assert_error(api.post(f"/v1/images/{created['id']}/uploaded", headers=AUTH_A), 409,
                  "upload_rejected")


def test_checksum_mismatch_is_rejected(api):
    body = png_bytes()
    created = _create(api, body, checksum_sha256="0" * 64)
    upload(created, body)
    _assert_error(api.post(f"/v1/images/{created['id']}/uploaded", headers=AUTH_A), 422,
                  "checksum_mismatch")


def test_transition_from_terminal_state_is_409(api, engine):
    created = _create(api, png_bytes())
    r = api.delete(f"/v1/images/{created['id']}", headers=AUTH_A)
    assert r.status_code == 200 and r.json()["state"] == "deleted"
    assert api.delete(f"/v1/images/{created['id']}", headers=AUTH_A).json()["version"] == 2
    _assert_error(api.put(f"/v1/images/{created['id']}/metadata", headers=AUTH_A, json=META),
                  409, "illegal_transition")
    _assert_error(api.post(f"/v1/images/{created['id']}/uploaded", headers=AUTH_A), 409,
                  "illegal_transition")
    assert _event_types(engine, created["id"]) == ["image.requested", "image.deleted"]


def test_concurrent_writes_with_if_match_exactly_one_wins(api, engine):
    created = _create(api, png_bytes())
    barrier = threading.Barrier(2)
    statuses: list[int] = []

    def put(title: str) -> None:
        barrier.wait()
        r = api.put(f"/v1/images/{created['id']}/metadata",
                    headers={**AUTH_A, "If-Match": '"1"'}, json={"title": title})
        statuses.append(r.status_code)

    threads = [threading.Thread(target=put, args=(t,)) for t in ("one", "two")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(statuses) == [200, 409]
    assert _event_types(engine, created["id"]) == ["image.requested", "image.metadata_updated"]


def test_listing_is_keyset_paginated_and_filtered(api):
    ids = [_create(api, png_bytes())["id"] for _ in range(5)]
    api.delete(f"/v1/images/{ids[0]}", headers=AUTH_A)
    seen, cursor = [], None
    while True:
        params = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        page = api.get("/v1/images", headers=AUTH_A, params=params).json()
        seen += [i["id"] for i in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == ids
    requested = api.get("/v1/images", headers=AUTH_A, params={"state": "requested"}).json()
    assert [i["id"] for i in requested["items"]] == ids[1:]
    forged = base64.urlsafe_b64encode(b'["2020-01-01T00:00:00", 5]').decode()
    for cursor in ("%%%", forged):
        _assert_error(api.get("/v1/images", headers=AUTH_A, params={"cursor": cursor}), 400,
                      "invalid_cursor")
    _assert_error(api.get("/v1/images", headers=AUTH_A, params={"state": "bogus"}), 422,
                  "invalid_request")


def test_unknown_id_and_route(api):
    _assert_error(api.get(f"/v1/images/{uuid.uuid4()}", headers=AUTH_A), 404, "not_found")
    _assert_error(api.get("/v1/images/not-a-uuid", headers=AUTH_A), 422, "invalid_request")
    _assert_error(api.get("/v2/nothing", headers=AUTH_A), 404, "not_found")
    assert api.get("/healthz").json() == {"status": "ok"}
    assert "outbox_http_requests_total" in api.get("/metrics").text
