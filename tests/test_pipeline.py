"""The whole pipeline end to end against the real services: upload -> OCR -> embedding ->
search, the task cache, redelivery, dead letters, the OCR failure path, and rebuilding the
views from the log."""

from __future__ import annotations

import json
import uuid

import pytest
import redis
from confluent_kafka import Consumer, Producer, TopicPartition
from elasticsearch import Elasticsearch
from fastapi.testclient import TestClient
from kafka import KafkaConsumer
from sqlalchemy import func, select, text

from outbox.db import make_engine
from outbox.kafka import dlq_topic
from outbox.tables import outbox_table
from outbox_app.api.app import create_app
from outbox_app.sample_images import text_image
from tests.auth import AUTH_A
from tests.db_roles import as_app
from tests.images import undecodable_png, upload
from tests.pipeline_harness import (
    PROJECTOR_NAMES,
    cache_at,
    isolated_settings,
    metric,
    wait_for,
)

pytestmark = pytest.mark.slow

ENGLISH = ["Harbour Cafe receipt", "Total 12.50 USD"]
CHINESE = ["超市购物收据", "牛奶 面包 鸡蛋"]


@pytest.fixture(scope="module")
def cfg():
    with isolated_settings("pipe") as s:
        yield s


@pytest.fixture(scope="module")
def api(cfg):
    app = create_app(as_app(cfg))  # the application's role, as in production
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client


def submit(api, lines: list[str] | None, title: str, body: bytes | None = None) -> str:
    body = body if body is not None else text_image(lines or [])
    r = api.post("/v1/images", headers=AUTH_A, json={
        "filename": "scan.png", "content_type": "image/png", "size": len(body),
        "metadata": {"title": title}})
    assert r.status_code == 201, r.text
    created = r.json()
    assert upload(created, body).status_code in (200, 204)
    r = api.post(f"/v1/images/{created['id']}/uploaded", headers=AUTH_A)
    assert r.status_code == 200 and r.json()["state"] == "ocr_pending", r.text
    return created["id"]


def image(api, image_id: str) -> dict:
    return api.get(f"/v1/images/{image_id}", headers=AUTH_A).json()


def search(api, q: str, mode: str) -> list[str]:
    r = api.get("/v1/search", headers=AUTH_A, params={"q": q, "mode": mode})
    assert r.status_code == 200, r.text
    return [h["id"] for h in r.json()["items"]]


@pytest.fixture(scope="module")
def searchable_pair(cfg, pipeline, api):
    en = submit(api, ENGLISH, "cafe receipt")
    zh = submit(api, CHINESE, "购物")
    first = image(api, en)
    assert first["searchable"] is False  # nothing has indexed it yet
    for i in (en, zh):
        doc = wait_for(lambda i=i: (d := image(api, i))["searchable"] and d,
                       what=f"{i} searchable")
        # The task cache is a projector of its own: it may still be a version behind the
        # search view, so wait for it too before any test reads or snapshots it.
        wait_for(lambda i=i, v=doc["version"]: cache_at(cfg, i, v), what=f"{i} cached")
    return en, zh


def test_upload_to_searchable_by_text_and_vector(api, searchable_pair):
    en, zh = searchable_pair
    doc = image(api, en)
    assert doc["state"] == "embedded" and doc["searchable"] is True
    assert doc["indexed_version"] == doc["version"]
    assert "Harbour" in doc["ocr"]["text"] and doc["ocr"]["language"] == "en"
    assert doc["tasks"]["ocr"]["state"] == "succeeded"
    assert doc["tasks"]["embed"]["state"] == "succeeded"
    assert doc["tasks"]["index"]["state"] == "succeeded"
    assert image(api, zh)["ocr"]["text"].startswith("超市购物收据")
    assert search(api, "harbour", "text")[0] == en
    assert search(api, "超市", "text")[0] == zh
    assert search(api, "鸡蛋", "text")[0] == zh
    assert search(api, "coffee shop bill", "vector")[0] == en
    assert search(api, "购物小票", "vector")[0] == zh
    assert search(api, "牛奶", "hybrid")[0] == zh


def _snapshot(cfg, ids):
    es = Elasticsearch(cfg.es_url)
    r = redis.Redis.from_url(cfg.redis_url)
    engine = make_engine(cfg)
    with engine.connect() as conn:
        events = conn.execute(select(func.count()).select_from(outbox_table)).scalar_one()
    engine.dispose()
    out = {"events": events}
    for i in ids:
        got = es.get(index=cfg.es_index, id=i)
        out[i] = (got["_version"], got["_source"],
                  r.hgetall(f"{cfg.redis_prefix}:task:{i}"))
    es.close()
    return out


def _applied() -> dict[str, float]:
    return {n: metric("outbox_projector_events_applied_total", projector=n)
            for n in PROJECTOR_NAMES}


def test_redelivery_changes_nothing(cfg, pipeline, searchable_pair):
    ids = list(searchable_pair)
    before = _snapshot(cfg, ids)
    ocr_runs = metric("outbox_ocr_engine_runs_total")
    texts = metric("outbox_embedding_texts_total")
    groups = {n: pipeline.runtimes[n].group_id for n in PROJECTOR_NAMES}
    for n in PROJECTOR_NAMES:
        pipeline.stop_projector(n)
    for t in pipeline.threads[1:]:
        t.join(30)
    topic = f"{cfg.topic_prefix}.image"
    with make_engine(cfg).connect() as conn:
        total = conn.execute(select(func.count()).select_from(outbox_table)
                             .where(outbox_table.c.aggregate_type == "image")).scalar_one()
    for group in groups.values():  # reset each group's committed offsets to the beginning
        c = Consumer({"bootstrap.servers": cfg.kafka_bootstrap, "group.id": group})
        parts = c.list_topics(topic, timeout=10).topics[topic].partitions
        c.commit(offsets=[TopicPartition(topic, p, 0) for p in parts], asynchronous=False)
        c.close()
    applied = _applied()
    for n, group in groups.items():
        pipeline.start_projector(n, group_id=group)
    for n in PROJECTOR_NAMES:
        wait_for(lambda n=n: _applied()[n] - applied[n] >= total, what=f"{n} replayed")
    assert metric("outbox_ocr_engine_runs_total") == ocr_runs
    assert metric("outbox_embedding_texts_total") == texts
    assert _snapshot(cfg, ids) == before


def test_undecodable_message_goes_to_dlq_and_the_rest_is_applied(cfg, pipeline, api):
    topic = f"{cfg.topic_prefix}.image"
    p = Producer({"bootstrap.servers": cfg.kafka_bootstrap})
    p.produce(topic, key=b"poison", value=b"\xff not json")
    p.produce(topic, key=b"poison2", value=json.dumps({"id": "nope"}).encode())
    assert p.flush(10) == 0
    after = submit(api, ["Poison pill follow up"], "after the poison")
    wait_for(lambda: image(api, after)["searchable"], what="image after poison searchable")
    dlq = KafkaConsumer(dlq_topic(topic, "cache"), bootstrap_servers=cfg.kafka_bootstrap,
                        auto_offset_reset="earliest", consumer_timeout_ms=5000)
    got = {m.key: dict(m.headers) for m in dlq}
    dlq.close()
    assert set(got) == {b"poison", b"poison2"}
    assert got[b"poison"]["reason"].startswith(b"undecodable")
    assert got[b"poison"]["source_topic"] == topic.encode()


def test_corrupt_object_ends_in_ocr_failed_with_its_error(cfg, pipeline, api):
    bad = submit(api, None, "broken scan", body=undecodable_png())
    doc = wait_for(lambda: (d := image(api, bad))["state"] == "ocr_failed" and d,
                   what="ocr_failed")
    assert doc["attempts"] == cfg.max_attempts
    assert "cannot decode image" in doc["last_error"]
    task = wait_for(lambda: (t := image(api, bad)["tasks"].get("ocr")) and
                    t["state"] == "failed" and t, what="failed task")
    assert task["attempt"] == str(cfg.max_attempts)
    assert "cannot decode image" in task["error"]
    assert doc["searchable"] is False


def test_views_rebuild_from_the_log_without_ocr_or_embedding(cfg, pipeline, searchable_pair):
    ids = list(searchable_pair)
    before = _snapshot(cfg, ids)
    ocr_runs = metric("outbox_ocr_engine_runs_total")
    texts = metric("outbox_embedding_texts_total")
    for n in ("search", "cache"):
        pipeline.stop_projector(n)
    for t in pipeline.threads:
        if t.name in ("projector-search", "projector-cache"):
            t.join(30)
    es = Elasticsearch(cfg.es_url)
    es.indices.delete(index=f"{cfg.es_index}-v1")
    r = redis.Redis.from_url(cfg.redis_url)
    for key in r.scan_iter(f"{cfg.redis_prefix}:task:*"):
        r.delete(key)
    assert not es.indices.exists(index=cfg.es_index)
    rebuild = uuid.uuid4().hex[:6]
    for n in ("search", "cache"):
        pipeline.start_projector(n, group_id=f"{cfg.topic_prefix}.{n}.rebuild-{rebuild}")
    wait_for(lambda: _snapshot_or_none(cfg, ids) == before, timeout_s=120, what="rebuilt")
    assert metric("outbox_ocr_engine_runs_total") == ocr_runs
    assert metric("outbox_embedding_texts_total") == texts
    es.close()


def _snapshot_or_none(cfg, ids):
    try:
        return _snapshot(cfg, ids)
    except Exception:
        return None


def _vector(cfg, image_id: str) -> list[float]:
    engine = make_engine(cfg)
    with engine.connect() as conn:
        embedding = conn.execute(text("select embedding from image where id = :id"),
                                 {"id": image_id}).scalar_one()
    engine.dispose()
    return embedding["vector"]


def test_metadata_edit_after_embedding_refreshes_the_vector(cfg, pipeline, api, searchable_pair):
    en, _ = searchable_pair
    version, vector = image(api, en)["version"], _vector(cfg, en)
    r = api.put(f"/v1/images/{en}/metadata", headers=AUTH_A,
                json={"title": "lighthouse postcard from the coast"})
    assert r.status_code == 200 and r.json()["state"] == "embedding_pending", r.text
    doc = wait_for(lambda: (d := image(api, en))["searchable"] and d, what="searchable again")
    assert doc["state"] == "embedded" and doc["version"] == version + 3
    assert _vector(cfg, en) != vector
    assert search(api, "lighthouse", "text")[0] == en
