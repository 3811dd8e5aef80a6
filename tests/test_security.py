"""Security and bad input against the real services: tenant isolation over every route,
misuse of the presigned POST, the request body limit, and secrets kept out of the logs."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import secrets
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager, suppress
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import requests
from botocore.exceptions import ClientError
from confluent_kafka.admin import AdminClient
from fastapi.routing import iter_route_contexts
from fastapi.testclient import TestClient
from psycopg import sql
from pydantic import SecretStr, ValidationError
from sqlalchemy import func, make_url, select

from outbox.tables import outbox_table
from outbox_app.api.app import create_app
from outbox_app.sample_images import text_image
from outbox_app.settings import AppSettings
from outbox_app.views.search import SearchProjector
from outbox_app.workers.embed import EmbeddingWorker
from outbox_app.workers.embedder import get_embedder
from outbox_app.workers.ocr import OcrWorker
from outbox_images.storage import object_key, s3_client
from outbox_images.tables import image_event_table, image_table
from tests.auth import AUTH_A, AUTH_B
from tests.events import events_of, latest_event
from tests.images import png_bytes, upload
from tests.pipeline_harness import PROJECTOR_NAMES, isolated_settings, wait_for
from tests.relay_harness import ROOT, RelayProc, free_port, health_of, settings_env, superuser

# Every route of the API, by how the sweep tries it with org B's key; a route missing here
# (or listed here and gone) fails the sweep.
ONE_IMAGE = "one image"  # another org's image answers exactly as an unknown id
ORG_SCOPED = "org scoped"  # shows or makes only the caller's org's images
NO_IMAGE_DATA = "no image data"  # documentation and operations: nothing of any org
SWEEP = {
    ("POST", "/v1/images/{image_id}/uploaded"): ONE_IMAGE,
    ("PUT", "/v1/images/{image_id}/metadata"): ONE_IMAGE,
    ("GET", "/v1/images/{image_id}"): ONE_IMAGE,
    ("GET", "/v1/images/{image_id}/history"): ONE_IMAGE,
    ("DELETE", "/v1/images/{image_id}"): ONE_IMAGE,
    ("POST", "/v1/images"): ORG_SCOPED,
    ("GET", "/v1/images"): ORG_SCOPED,
    ("GET", "/v1/search"): ORG_SCOPED,
    ("GET", "/v1/status"): ORG_SCOPED,
    **{("GET", path): NO_IMAGE_DATA for path in
       ("/status", "/status/status.js", "/status/status.css")},
    **{(method, path): NO_IMAGE_DATA for path in
       ("/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc") for method in ("GET", "HEAD")},
    ("GET", "/metrics"): NO_IMAGE_DATA,
    ("GET", "/healthz"): NO_IMAGE_DATA,
    ("GET", "/readyz"): NO_IMAGE_DATA,
}
TITLE = "Quarterly ledger of the harbour office"


def _create(api, body: bytes, auth: dict[str, str] = AUTH_A, **extra: Any) -> dict[str, Any]:
    r = api.post("/v1/images", headers=auth, json={
        "filename": "scan.png", "content_type": "image/png", "size": len(body), **extra})
    assert r.status_code == 201, r.text
    return r.json()


def _assert_error(r: httpx.Response, status: int, code: str) -> None:
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == code, r.text


def _snapshot(engine) -> tuple[list[dict[str, Any]], int, int]:
    """Every image row, and the number of outbox and history rows: what a write changes."""
    with engine.connect() as conn:
        rows = conn.execute(select(image_table).order_by(image_table.c.id)).mappings().all()
        return ([dict(r) for r in rows],
                conn.execute(select(func.count()).select_from(outbox_table)).scalar_one(),
                conn.execute(select(func.count()).select_from(image_event_table)).scalar_one())


def _etag(settings: AppSettings, key: str) -> str | None:
    try:
        return s3_client(settings).head_object(Bucket=settings.s3_bucket, Key=key)["ETag"]
    except ClientError as exc:
        if exc.response["Error"]["Code"] in {"404", "NoSuchKey", "NotFound"}:
            return None
        raise


@pytest.fixture
def search_view(api_settings: AppSettings, es) -> Iterator[SearchProjector]:
    """The search projector of this test's index; the index is deleted afterwards."""
    yield SearchProjector(api_settings, es, None)
    for index in es.indices.get(index=f"{api_settings.es_index}-*", ignore_unavailable=True):
        es.indices.delete(index=index)


def _searchable_image(api, settings: AppSettings, engine, search_view) -> str:
    """An image of org A through the real OCR and embedding workers into the search view."""
    body = text_image([TITLE, "Total 12.00"])
    created = _create(api, body, metadata={"title": TITLE})
    assert upload(created, body).status_code in (200, 204)
    assert api.post(f"/v1/images/{created['id']}/uploaded", headers=AUTH_A).status_code == 200
    OcrWorker(settings, engine, s3_client(settings)).apply([latest_event(engine, created["id"])])
    EmbeddingWorker(settings, engine, get_embedder(settings.embedding_model)).apply(
        [latest_event(engine, created["id"])])
    search_view.apply(events_of(engine, created["id"]))
    got = api.get(f"/v1/images/{created['id']}", headers=AUTH_A).json()
    assert got["searchable"], got
    return created["id"]


def _unknown_id_answer(r: httpx.Response, image_id: str) -> tuple[int, Any, list[str]]:
    """The response with the image id taken out, to compare with an unknown id's."""
    body = json.loads(r.text.replace(image_id, "<id>"))
    return r.status_code, body, sorted(r.headers.keys())


def test_no_route_shows_or_changes_another_orgs_image(api, api_settings, engine, search_view):
    routes = {(method, ctx.path) for ctx in iter_route_contexts(api.app.routes)
              for method in ctx.methods or ()}
    assert routes == set(SWEEP), (f"not in the sweep: {sorted(routes - set(SWEEP))}; "
                                  f"gone: {sorted(set(SWEEP) - routes)}")
    waiting = png_bytes("waiting for confirmation")
    unconfirmed = _create(api, waiting, metadata={"title": TITLE})  # uploaded, not confirmed
    assert upload(unconfirmed, waiting).status_code in (200, 204)
    theirs = [unconfirmed["id"], _searchable_image(api, api_settings, engine, search_view)]
    keys = [object_key("org-a", i) for i in theirs]
    objects = [_etag(api_settings, k) for k in keys]
    before = _snapshot(engine)

    def call(method: str, path: str, image_id: str, auth: dict[str, str]) -> httpx.Response:
        json_body = {"title": "written by org b"} if method == "PUT" else None
        return api.request(method, path.replace("{image_id}", image_id), headers=auth,
                           json=json_body)

    for (method, path), kind in sorted(SWEEP.items()):
        if kind == ONE_IMAGE:
            guessed = str(uuid.uuid4())
            unknown = _unknown_id_answer(call(method, path, guessed, AUTH_A), guessed)
            assert unknown[0] == 404 and unknown[1]["error"]["code"] == "not_found", unknown
            for image_id in [*theirs, str(uuid.uuid4())]:
                r = call(method, path, image_id, AUTH_B)
                assert _unknown_id_answer(r, image_id) == unknown, (method, path, r.text)
        elif kind == NO_IMAGE_DATA:
            r = api.request(method, path, headers=AUTH_B)
            assert r.status_code == 200 and not any(i in r.text for i in theirs), (method, path)
    for image_id in theirs:  # the images are there for their own org
        assert api.get(f"/v1/images/{image_id}", headers=AUTH_A).status_code == 200
        assert api.get(f"/v1/images/{image_id}/history", headers=AUTH_A).status_code == 200

    listed = api.get("/v1/images", headers=AUTH_A, params={"limit": 1}).json()
    assert listed["items"][0]["id"] in theirs and listed["next_cursor"]
    for params in ({}, {"state": "requested"}, {"state": "embedded"},
                   {"cursor": listed["next_cursor"]}):
        assert api.get("/v1/images", headers=AUTH_B, params=params).json()["items"] == []
        assert api.get("/v1/images", headers=AUTH_A, params=params).json()["items"]
    for mode in ("text", "vector", "hybrid"):
        params = {"q": TITLE, "mode": mode}
        mine = api.get("/v1/search", headers=AUTH_A, params=params).json()
        assert theirs[1] in [hit["id"] for hit in mine["items"]], mode
        found = api.get("/v1/search", headers=AUTH_B, params=params).json()
        assert (found["total"], found["items"]) == (0, []), mode
    # The status: org A's counts its two images; org B's shows none of them.
    mine, found = (api.get("/v1/status", headers=auth) for auth in (AUTH_A, AUTH_B))
    assert mine.status_code == found.status_code == 200, (mine.text, found.text)
    assert sum(i["count"] for i in mine.json()["images"]) == 2
    assert sum(i["count"] for i in found.json()["images"]) == 0
    assert not any(i in found.text for i in theirs)
    assert _snapshot(engine) == before  # nothing written by any of the tries above
    assert [_etag(api_settings, k) for k in keys] == objects

    # Creating names no org: the key's org is the caller's, an org in the body is refused.
    _assert_error(api.post("/v1/images", headers=AUTH_B, json={
        "filename": "a.png", "content_type": "image/png", "size": 10, "org_id": "org-a"}),
        422, "invalid_request")
    made = _create(api, waiting, auth=AUTH_B)
    assert made["upload_fields"]["key"] == object_key("org-b", made["id"])
    assert api.get(f"/v1/images/{made['id']}", headers=AUTH_B).json()["org_id"] == "org-b"
    after = _snapshot(engine)
    assert [r for r in after[0] if r["org_id"] == "org-a"] == before[0]


def _post_with(created: dict[str, Any], body: bytes, **fields: str) -> httpx.Response:
    return upload({**created, "upload_fields": {**created["upload_fields"], **fields}}, body)


def _policy_allowing_any_key(fields: dict[str, str]) -> str:
    policy = json.loads(base64.b64decode(fields["policy"]))
    policy["conditions"] = [c for c in policy["conditions"]
                            if not (isinstance(c, dict) and "key" in c)]
    policy["conditions"].append(["starts-with", "$key", ""])
    return base64.b64encode(json.dumps(policy).encode()).decode()


def test_a_presigned_post_writes_only_its_own_key(api, api_settings):
    body = png_bytes("mine")
    mine = _create(api, body)
    other = png_bytes("another image")
    neighbour = _create(api, other)
    assert upload(neighbour, other).status_code in (200, 204)
    neighbour_etag = _etag(api_settings, neighbour["upload_fields"]["key"])
    foreign = _create(api, body, auth=AUTH_B)
    # ${filename} would be replaced by the file's name (x.png) if the policy allowed it.
    elsewhere = ["orgs/org-a/images/${filename}", "orgs/org-a/images/x.png", "anything.png"]
    for key in [neighbour["upload_fields"]["key"], foreign["upload_fields"]["key"], *elsewhere]:
        r = _post_with(mine, body, key=key)
        assert r.status_code == 403 and "AccessDenied" in r.text, (key, r.text)
    # A key with a dot segment (meaning the neighbour's) is refused before the policy is read.
    r = _post_with(mine, body, key=f"orgs/org-a/images/{mine['id']}/../{neighbour['id']}")
    assert r.status_code == 400 and "InvalidRequest" in r.text, r.text
    # A policy rewritten to allow any key no longer matches its signature.
    r = _post_with(mine, body, key=neighbour["upload_fields"]["key"],
                   policy=_policy_allowing_any_key(mine["upload_fields"]))
    assert r.status_code == 403 and "SignatureDoesNotMatch" in r.text, r.text
    assert _etag(api_settings, neighbour["upload_fields"]["key"]) == neighbour_etag
    for key in [foreign["upload_fields"]["key"], *elsewhere]:
        assert _etag(api_settings, key) is None, key
    assert upload(mine, body).status_code in (200, 204)  # the POST itself was good all along
    assert _etag(api_settings, mine["upload_fields"]["key"]) is not None


def test_an_expired_presigned_post_is_refused(api_settings):
    with pytest.raises(ValidationError):
        AppSettings(upload_url_ttl_s=0)
    assert AppSettings(upload_url_ttl_s=2).upload_url_ttl_s == 2
    short = api_settings.model_copy(update={"upload_url_ttl_s": 2})
    body = png_bytes("late")
    with TestClient(create_app(short), raise_server_exceptions=False) as api:
        late, in_time = _create(api, body), _create(api, body)
        expires_at = datetime.fromisoformat(late["expires_at"])
        assert (expires_at - datetime.now(UTC)).total_seconds() <= 2
        assert upload(in_time, body).status_code in (200, 204)
        time.sleep(max(0.0, (expires_at - datetime.now(UTC)).total_seconds()) + 1.5)
        r = upload(late, body)
        assert r.status_code == 403 and "expired" in r.text, r.text
        _assert_error(api.post(f"/v1/images/{late['id']}/uploaded", headers=AUTH_A), 409,
                      "upload_missing")
        assert api.post(f"/v1/images/{in_time['id']}/uploaded",
                        headers=AUTH_A).status_code == 200


def _padded(body: dict[str, Any], size: int) -> bytes:
    """`body` as JSON, padded with whitespace to exactly `size` bytes."""
    raw = json.dumps(body).encode()
    return raw + b" " * (size - len(raw))


@pytest.mark.parametrize(("method", "path", "body"), [
    ("POST", "", {"filename": "a.png", "content_type": "image/png", "size": 10}),
    ("PUT", "/{id}/metadata", {"title": "too long a request"}),
    ("DELETE", "/{id}", {}),
    ("POST", "/{id}/uploaded", {}),
])
def test_a_body_over_the_limit_is_refused_by_its_length(api, api_settings, engine, method,
                                                         path, body):
    target = _create(api, png_bytes())
    before = _snapshot(engine)
    limit = api_settings.max_request_body_bytes
    url = "/v1/images" + path.replace("{id}", target["id"])
    r = api.request(method, url, headers={**AUTH_A, "Content-Type": "application/json"},
                    content=_padded(body, limit + 1))
    assert r.request.headers["content-length"] == str(limit + 1)
    _assert_error(r, 413, "body_too_large")
    assert _snapshot(engine) == before
    if method == "POST" and not path:  # at the limit, the same body is taken
        r = api.post(url, headers={**AUTH_A, "Content-Type": "application/json"},
                     content=_padded(body, limit))
        assert r.status_code == 201, r.text


def test_a_chunked_body_over_the_limit_is_refused_while_read(api, api_settings, engine):
    limit, chunk = api_settings.max_request_body_bytes, 4096
    pulled = 0

    async def endless() -> AsyncIterator[bytes]:
        nonlocal pulled
        yield b'{"filename": "a.png", "content_type": "image/png", "size": 10, "x": "'
        while pulled < 10_000:  # 40 MB: a limit that is not enforced ends here, not never
            pulled += 1
            yield b"x" * chunk

    async def small() -> AsyncIterator[bytes]:
        for part in (b'{"filename": "a.png", ', b'"content_type": "image/png", ',
                     b'"size": 10}'):
            yield part

    async def send(content: AsyncIterator[bytes]) -> httpx.Response:
        transport = httpx.ASGITransport(app=api.app)  # each chunk its own ASGI message
        async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
            return await client.post("/v1/images", content=content,
                                     headers={**AUTH_A, "Content-Type": "application/json"})

    before = _snapshot(engine)
    r = asyncio.run(send(endless()))
    assert "content-length" not in r.request.headers
    assert r.request.headers["transfer-encoding"] == "chunked"
    _assert_error(r, 413, "body_too_large")
    assert pulled * chunk <= limit + 2 * chunk  # reading stopped at the limit
    assert _snapshot(engine) == before
    r = asyncio.run(send(small()))  # a chunked body within the limit is read whole
    assert r.status_code == 201, r.text


def test_the_largest_valid_body_is_within_the_default_limit(api):
    wide = "\U0001F600"  # outside the BMP: 12 bytes as escaped JSON, the most per character
    body = {"filename": wide * 255, "content_type": "image/png", "size": 10,
            "checksum_sha256": "0" * 64, "metadata": {
                "title": wide * 200, "description": wide * 5000, "tags": [wide * 64] * 32,
                "language": "zh-Hans-CN-abcdefgh"}}
    raw = json.dumps(body).encode()  # ensure_ascii, as Python's requests sends it
    assert len(raw) > 64 * 1024  # why the default is not 64 KiB
    assert len(raw) <= AppSettings.model_fields["max_request_body_bytes"].default
    r = api.post("/v1/images", headers={**AUTH_A, "Content-Type": "application/json"},
                 content=raw)
    assert r.status_code == 201, r.text


@contextmanager
def _login_role(settings: AppSettings, password: str) -> Iterator[str]:
    """A role that logs in with `password` and owns this test's tables (so its relay can
    publish them); yields its database URL. The role is dropped afterwards."""
    url = make_url(settings.database_url)
    name = f"sec_{uuid.uuid4().hex[:8]}"
    role = sql.Identifier(name)
    with superuser() as su:
        su.execute(sql.SQL("CREATE ROLE {} LOGIN REPLICATION PASSWORD {}").format(
            role, sql.Literal(password)))
        su.execute(sql.SQL("GRANT CREATE ON DATABASE {} TO {}").format(  # the publication
            sql.Identifier(url.database), role))
        su.execute(sql.SQL("GRANT USAGE, CREATE ON SCHEMA {} TO {}").format(
            sql.Identifier(settings.db_schema), role))
        # outbox_emit runs as its owner (SECURITY DEFINER): it follows its tables.
        su.execute(sql.SQL("ALTER FUNCTION {}.outbox_emit(text, text, text, jsonb, bigint,"
                           " text, jsonb) OWNER TO {}").format(
            sql.Identifier(settings.db_schema), role))
        tables = su.execute("select tablename from pg_tables where schemaname = %s",
                            (settings.db_schema,)).fetchall()
        for (table,) in tables:
            su.execute(sql.SQL("ALTER TABLE {} OWNER TO {}").format(
                sql.Identifier(settings.db_schema, table), role))
    try:
        yield url.set(username=name, password=password).render_as_string(hide_password=False)
    finally:
        with superuser() as su:
            su.execute(sql.SQL("REASSIGN OWNED BY {} TO {}").format(
                role, sql.Identifier(url.username)))
            su.execute(sql.SQL("DROP OWNED BY {}").format(role))
            su.execute(sql.SQL("DROP ROLE {}").format(role))


def _delete_topics(settings: AppSettings) -> None:
    admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap})
    mine = [t for t in admin.list_topics(timeout=10).topics
            if t.startswith(settings.topic_prefix + ".")]
    for future in (admin.delete_topics(mine) if mine else {}).values():
        future.result(timeout=30)


def _spawn(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    with open(log, "ab") as out:  # the child keeps its own descriptor
        return subprocess.Popen([sys.executable, "-m", "outbox.cli", *args], env=env,
                                stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM by PID (its last log lines are written too), SIGKILL if it does not exit."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


@pytest.mark.slow
def test_no_secret_reaches_any_log(tmp_path):
    key_a, key_b, wrong_key = (f"sk-{secrets.token_hex(16)}" for _ in range(3))
    password = secrets.token_hex(16)
    with isolated_settings("sec") as isolated, _login_role(isolated, password) as db_url:
        cfg = isolated.model_copy(update={
            "database_url": db_url, "api_keys": SecretStr(f"{key_a}:org-a,{key_b}:org-b")})
        env = {**os.environ, **settings_env(cfg), "OUTBOX_DATABASE_URL": db_url}
        api_port, ports = free_port(), {name: free_port() for name in PROJECTOR_NAMES}
        children: dict[str, subprocess.Popen] = {}
        relay = None
        try:
            children["api"] = _spawn(["api", "--host", "127.0.0.1", "--port", str(api_port),
                                      "--log-level", "DEBUG"], env, tmp_path / "api.log")
            for name, port in ports.items():
                children[name] = _spawn(["project", name, "--metrics-host", "127.0.0.1",
                                         "--metrics-port", str(port), "--log-level", "DEBUG"],
                                        env, tmp_path / f"{name}.log")
            relay = RelayProc(cfg, "logical", tmp_path / "relay.log",
                              OUTBOX_DATABASE_URL=db_url, OUTBOX_LOG_LEVEL="DEBUG")
            relay.wait_role("leader", timeout_s=60)
            for port in [api_port, *ports.values()]:
                wait_for(lambda p=port: (health_of(p) or {}).get("status") == "ok",
                         timeout_s=60, what=f"health on port {port}")
            base, auth = f"http://127.0.0.1:{api_port}", {"Authorization": f"Bearer {key_a}"}
            body = text_image(["Harbour ledger", "Total 42.00"])
            created = requests.post(f"{base}/v1/images", headers=auth, timeout=10, json={
                "filename": "ledger.png", "content_type": "image/png",
                "size": len(body)}).json()
            image_id, fields = created["id"], created["upload_fields"]
            assert upload(created, body).status_code in (200, 204)
            for method, path, extra in [("POST", "/uploaded", {}),
                                        ("PUT", "/metadata", {"json": {"title": "Ledger"}})]:
                r = requests.request(method, f"{base}/v1/images/{image_id}{path}",
                                     headers=auth, timeout=10, **extra)
                assert r.status_code == 200, r.text
            wait_for(lambda: requests.get(f"{base}/v1/images/{image_id}", headers=auth,
                                          timeout=10).json()["searchable"],
                     timeout_s=180, what="searchable")
            hits = requests.get(f"{base}/v1/search", headers=auth, timeout=30,
                                params={"q": "harbour ledger"}).json()["items"]
            assert image_id in [h["id"] for h in hits]
            for key, status in ((key_b, 404), (wrong_key, 401)):
                r = requests.get(f"{base}/v1/images/{image_id}", timeout=10,
                                 headers={"Authorization": f"Bearer {key}"})
                assert r.status_code == status, r.text
        finally:
            if relay is not None:
                with suppress(subprocess.TimeoutExpired):
                    relay.terminate()
                relay.stop()  # SIGKILL if SIGTERM was not enough
            for proc in children.values():
                _stop(proc)
            _delete_topics(cfg)
    logs = {p.name: p.read_text(errors="replace") for p in sorted(tmp_path.glob("*.log"))}
    started = {"api.log": "Application startup complete", "relay.log": "relay_started",
               **{f"{name}.log": "projector_started" for name in PROJECTOR_NAMES}}
    assert {name: mark in logs.get(name, "") for name, mark in started.items()} == dict.fromkeys(
        started, True)
    assert '"level": "debug"' in logs["api.log"]
    assert image_id in logs["api.log"] and image_id in logs["ocr.log"]  # the logs saw it
    hidden = {"org A's API key": key_a, "org B's API key": key_b, "a wrong API key": wrong_key,
              "the presigned POST's signature": fields["x-amz-signature"],
              "the presigned POST's policy": fields["policy"],
              "the S3 secret key": os.environ["AWS_SECRET_ACCESS_KEY"],
              "the database password": password}
    leaks = [f"{what} in {name}: {line[:300]}" for what, value in hidden.items()
             for name, text in logs.items() for line in text.splitlines() if value in line]
    assert not leaks, "\n".join(leaks)
