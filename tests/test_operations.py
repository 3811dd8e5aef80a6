"""The operator's tools against the real stores: `outbox retry`, `outbox trace` (and the
history endpoint), `outbox dlq list|replay`."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from confluent_kafka import Producer
from fastapi.testclient import TestClient
from kafka import KafkaConsumer

from outbox.kafka import dlq_topic, topic_name
from outbox_app.api.app import create_app
from outbox_app.sample_images import text_image
from outbox_images.storage import object_key, s3_client
from tests.auth import AUTH_A, AUTH_B
from tests.images import undecodable_png, upload
from tests.pipeline_harness import isolated_settings, wait_for
from tests.relay_harness import settings_env

pytestmark = pytest.mark.slow

TRACE = "0af7651916cd43dd8448eb211c80319c"


@pytest.fixture(scope="module")
def cfg():
    with isolated_settings("ops") as s:
        yield s


@pytest.fixture(scope="module")
def api(cfg):
    with TestClient(create_app(cfg), raise_server_exceptions=False) as client:
        yield client


def cli(cfg, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "outbox.cli", *args],
                          env={**os.environ, **settings_env(cfg)}, capture_output=True,
                          text=True, timeout=120)


def _state(api, image_id: str) -> str:
    return api.get(f"/v1/images/{image_id}", headers=AUTH_A).json()["state"]


def test_a_failed_image_is_retried_and_its_trace_shows_every_step(cfg, pipeline, api):
    corrupt = undecodable_png().ljust(45_000, b"\0")  # room for the fixed image below
    created = api.post("/v1/images", json={
        "filename": "scan.png", "content_type": "image/png", "size": len(corrupt),
        "metadata": {"title": "Retried receipt"}},
        headers={**AUTH_A, "traceparent": f"00-{TRACE}-b7ad6b7169203331-01"}).json()
    image_id = created["id"]
    assert upload(created, corrupt).status_code in (200, 204)
    assert api.post(f"/v1/images/{image_id}/uploaded", headers=AUTH_A).status_code == 200
    wait_for(lambda: _state(api, image_id) == "ocr_failed", what="ocr_failed")

    refused = cli(cfg, "retry", image_id.replace("-", "")[:8])
    assert refused.returncode == 2  # not an id: a clear error, nothing done
    # The cause is fixed (the client uploads a readable image of the declared size), then
    # the operator retries: the retry verifies the new object and pins it.
    fixed = text_image(["Retried receipt", "Total 7.00"])
    assert len(fixed) <= len(corrupt)
    s3_client(cfg).put_object(Bucket=cfg.s3_bucket, Key=object_key("org-a", image_id),
                              Body=fixed.ljust(len(corrupt), b"\0"), ContentType="image/png")
    done = cli(cfg, "retry", "--state", "ocr_failed", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["retried"] == [image_id]
    wait_for(lambda: api.get(f"/v1/images/{image_id}", headers=AUTH_A).json()["searchable"],
             what="searchable after the retry")
    again = cli(cfg, "retry", image_id)
    assert again.returncode == 1 and "not a failed state" in again.stdout

    shown = cli(cfg, "trace", image_id, "--json", "--kafka-offsets", "10000")
    assert shown.returncode == 0, shown.stderr
    journey = json.loads(shown.stdout)
    types = [e["type"] for e in journey["history"]]
    for step in ("image.requested", "image.uploaded", "image.ocr_requested",
                 "image.ocr_started", "image.ocr_failed", "image.ocr_retried",
                 "image.ocr_completed", "image.embedding_requested", "image.embedded"):
        assert step in types, (step, types)
    assert types.index("image.ocr_failed") < types.index("image.ocr_retried") \
        < types.index("image.ocr_completed")
    # One trace from the upload request through the workers' results.
    assert journey["image"]["trace_id"] == TRACE
    assert {e["traceparent"].split("-")[1] for e in journey["history"]} == {TRACE}
    assert all(e["kafka"]["offset"] is not None for e in journey["history"])
    assert journey["views"]["search"]["holds"] == journey["image"]["version"]
    assert journey["object"]["exists"] is True
    over_http = api.get(f"/v1/images/{image_id}/history", headers=AUTH_A)
    assert over_http.status_code == 200
    assert [e["event_id"] for e in over_http.json()["history"]] == \
        [e["event_id"] for e in journey["history"]]
    assert api.get(f"/v1/images/{image_id}/history", headers=AUTH_B).status_code == 404


def test_dead_letters_are_listed_with_reasons_and_replayed_once(cfg, pipeline, api):
    topic = topic_name(cfg.topic_prefix, "image")
    producer = Producer({"bootstrap.servers": cfg.kafka_bootstrap})
    producer.produce(topic, key=b"poison-op", value=b"\xff not json")
    assert producer.flush(10) == 0
    dead = dlq_topic(topic, "cache")

    def letters() -> list[dict]:
        r = cli(cfg, "dlq", "list", dead, "--json")
        assert r.returncode == 0, r.stderr
        return [d for d in json.loads(r.stdout) if d["key"] == "poison-op"]

    listed = wait_for(letters, what="the poison message dead-lettered")
    assert listed[0]["reason"].startswith("undecodable")
    assert listed[0]["source_topic"] == topic and listed[0]["replayable"] is True
    first = cli(cfg, "dlq", "replay", dead, "--json")
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout)["replayed"] == 1
    # The cause is not fixed here: the copy fails again and is a new dead letter. The next
    # replay sends only that one, never the first again.
    wait_for(lambda: len(letters()) == 2, what="the replayed copy dead-lettered again")
    second = cli(cfg, "dlq", "replay", dead, "--json")
    assert json.loads(second.stdout)["replayed"] == 1
    source = KafkaConsumer(topic, bootstrap_servers=cfg.kafka_bootstrap,
                           auto_offset_reset="earliest", consumer_timeout_ms=5000)
    copies = [m for m in source if m.key == b"poison-op"]
    source.close()
    assert len(copies) == 3  # the original and one copy per replay
    assert "reason" not in dict(copies[1].headers)
    bad = cli(cfg, "dlq", "list", topic)
    assert bad.returncode == 2 and "not a dead-letter topic" in bad.stderr
