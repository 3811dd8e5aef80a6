"""The image pipeline end to end (upload -> OCR -> embedding -> searchable) in each wire
format: the relay writes it, every projector reads it."""

from __future__ import annotations

import pytest
from confluent_kafka import Consumer, TopicPartition
from fastapi.testclient import TestClient

from outbox.wire_formats import event_topic
from outbox_app.api.app import create_app
from outbox_app.sample_images import text_image
from tests.auth import AUTH_A
from tests.images import upload
from tests.pipeline_harness import PROJECTOR_NAMES, Pipeline, isolated_settings, wait_for

pytestmark = pytest.mark.slow


def _submit(api: TestClient, lines: list[str]) -> str:
    body = text_image(lines)
    r = api.post("/v1/images", headers=AUTH_A, json={
        "filename": "scan.png", "content_type": "image/png", "size": len(body),
        "metadata": {"title": "wire format"}})
    assert r.status_code == 201, r.text
    created = r.json()
    assert upload(created, body).status_code in (200, 204)
    assert api.post(f"/v1/images/{created['id']}/uploaded", headers=AUTH_A).status_code == 200
    return created["id"]


def _format_of(headers: list[tuple[str, bytes]] | None) -> str:
    """The wire format a record's headers say it is in (read here, not by the decoder under
    test): CloudEvents attributes, the structured content type, the debezium field headers."""
    named = dict(headers or [])
    if named.get("ce_specversion") == b"1.0":
        return "cloudevents-binary"
    if named.get("content-type", b"").startswith(b"application/cloudevents+json"):
        return "cloudevents-structured"
    return "debezium" if "occurred_at" in named else "envelope"


def _formats_in(settings, topic: str) -> set[str]:
    consumer = Consumer({"bootstrap.servers": settings.kafka_bootstrap,
                         "group.id": f"{topic}.check", "enable.auto.commit": False})
    try:
        parts = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        consumer.assign([TopicPartition(topic, p, 0) for p in parts])
        msgs = consumer.consume(100, timeout=3)
    finally:
        consumer.close()
    return {_format_of(m.headers()) for m in msgs if m.error() is None}


@pytest.mark.parametrize("fmt", ["envelope", "debezium", "cloudevents-binary",
                                 "cloudevents-structured"])
def test_an_image_becomes_searchable_in_each_wire_format(fmt):
    with isolated_settings("wf") as base:
        cfg = base.model_copy(update={
            "wire_format": fmt,
            "debezium_topic_replacement": f"{base.topic_prefix}.dbz.${{routedByValue}}"})
        pipeline = Pipeline(cfg)
        try:
            pipeline.start_relay()
            for name in PROJECTOR_NAMES:
                pipeline.start_projector(name)
            with TestClient(create_app(cfg), raise_server_exceptions=False) as api:
                image_id = _submit(api, ["Harbour Cafe receipt", "Total 12.50 USD"])
                doc = wait_for(lambda: (d := api.get(f"/v1/images/{image_id}",
                                                     headers=AUTH_A).json())["searchable"]
                               and d, what="searchable")
                hits = api.get("/v1/search", headers=AUTH_A,
                               params={"q": "harbour", "mode": "hybrid"}).json()["items"]
        finally:
            pipeline.stop()
        assert doc["state"] == "embedded" and doc["indexed_version"] == doc["version"]
        assert "Harbour" in doc["ocr"]["text"]
        assert [h["id"] for h in hits][:1] == [image_id]
        topic = event_topic(cfg, "image")
        assert topic == (f"{cfg.topic_prefix}.dbz.image" if fmt == "debezium"
                         else f"{cfg.topic_prefix}.image")
        assert _formats_in(cfg, topic) == {fmt}
