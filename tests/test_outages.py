"""Outages and crafted input never become drift: a bucket outage costs no OCR attempt, a
replaced object is never read, the declared size is enforced, read endpoints degrade to
503, a dead letter too large for its topic does not stop a projector, a Redis out of
memory is waited out, and a search projector started while its server is down waits for it."""

from __future__ import annotations

import threading
import time
import uuid
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import redis
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic
from elasticsearch import Elasticsearch
from fastapi.testclient import TestClient
from kafka import KafkaConsumer
from pydantic import SecretStr

from outbox.envelope import EventEnvelope
from outbox.kafka import dlq_topic, topic_name
from outbox_app.api.app import create_app
from outbox_app.sample_images import text_image
from outbox_app.store_errors import is_outage
from outbox_app.workers.ocr import OcrWorker
from outbox_images.storage import s3_client
from projectors.registry import build_runtime
from tests.auth import AUTH_A
from tests.events import latest_event
from tests.images import upload
from tests.own_redis import OwnRedis
from tests.pipeline_harness import isolated_settings, metric, wait_for
from tests.relay_harness import free_port
from tests.tls_proxy import TcpProxy


def _image_waiting_for_ocr(api, body: bytes, replace_with: bytes | None = None) -> str:
    created = api.post("/v1/images", headers=AUTH_A, json={
        "filename": "a.png", "content_type": "image/png", "size": len(body)}).json()
    assert upload(created, body).status_code in (200, 204)
    assert api.post(f"/v1/images/{created['id']}/uploaded", headers=AUTH_A).status_code == 200
    if replace_with is not None:  # the presigned POST is used again after the confirmation
        assert upload(created, replace_with).status_code in (200, 204)
    r = api.put(f"/v1/images/{created['id']}/metadata", headers=AUTH_A,
                json={"title": "scan"})
    assert r.json()["state"] == "ocr_pending"
    return created["id"]


def _state(engine, image_id: str) -> tuple[str, int]:
    event = latest_event(engine, image_id)
    return event.payload["state"], event.payload["attempts"]


def test_a_bucket_outage_costs_no_ocr_attempt(api, api_settings, engine):
    image_id = _image_waiting_for_ocr(api, text_image(["Bucket outage", "Total 1.00"]))
    down = api_settings.model_copy(update={"s3_endpoint": f"http://127.0.0.1:{free_port()}"})
    worker = OcrWorker(down, engine, s3_client(down))
    for _ in range(api_settings.max_attempts + 1):
        with pytest.raises(Exception) as raised:
            worker.apply([latest_event(engine, image_id)])
        assert is_outage(raised.value)  # the runtime waits it out, partitions paused
    assert _state(engine, image_id) == ("ocr_pending", 0)
    OcrWorker(api_settings, engine, s3_client(api_settings)).apply(
        [latest_event(engine, image_id)])
    assert _state(engine, image_id)[0] == "embedding_pending"


def test_an_object_replaced_after_verification_is_never_read(api, api_settings, engine):
    verified = text_image(["Verified receipt"])
    forged = text_image(["Forged receipt", "Pay 9999"])
    # The same size, as the upload policy demands (bytes after a PNG's end are ignored).
    size = max(len(verified), len(forged))
    verified, forged = verified.ljust(size, b"\0"), forged.ljust(size, b"\0")
    image_id = _image_waiting_for_ocr(api, verified, replace_with=forged)
    runs = metric("outbox_ocr_engine_runs_total")
    worker = OcrWorker(api_settings, engine, s3_client(api_settings))
    for _ in range(api_settings.max_attempts):
        worker.apply([latest_event(engine, image_id)])
    doc = api.get(f"/v1/images/{image_id}", headers=AUTH_A).json()
    assert doc["state"] == "ocr_failed"
    assert "replaced after it was verified" in doc["last_error"]
    assert metric("outbox_ocr_engine_runs_total") == runs  # the forged bytes were not read


def test_the_declared_size_is_enforced(api):
    body = text_image(["Declared size"])
    created = api.post("/v1/images", headers=AUTH_A, json={
        "filename": "a.png", "content_type": "image/png", "size": 100}).json()
    assert upload(created, body).status_code == 400  # the storage refuses another size
    exact = api.post("/v1/images", headers=AUTH_A, json={
        "filename": "a.png", "content_type": "image/png", "size": len(body) + 1}).json()
    assert upload(exact, body).status_code == 400


class Answers429ServerMock(BaseHTTPRequestHandler):
    """Stands in for an overloaded Elasticsearch: the real server cannot be made to answer
    429 on demand."""

    def do_GET(self) -> None:
        self._reject()

    def do_POST(self) -> None:
        self._reject()

    def _reject(self) -> None:
        body = (b'{"error":{"type":"es_rejected_execution_exception","reason":"queue full"},'
                b'"status":429}')
        self.send_response(429)
        self.send_header("Content-Type", "application/json")
        self.send_header("X-Elastic-Product", "Elasticsearch")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_: object) -> None:
        return


def test_reads_degrade_when_a_view_store_is_down_search_answers_503(api_settings):
    server = ThreadingHTTPServer(("127.0.0.1", 0), Answers429ServerMock)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    broken = api_settings.model_copy(update={
        "redis_url": f"redis://127.0.0.1:{free_port()}/0",
        "es_url": f"http://127.0.0.1:{server.server_address[1]}",
        "api_keys": SecretStr("key-a:org-a")})
    try:
        with TestClient(create_app(broken), raise_server_exceptions=False) as client:
            created = client.post("/v1/images", headers=AUTH_A, json={
                "filename": "a.png", "content_type": "image/png", "size": 10}).json()
            # The image is read from the database; the views it cannot reach are named.
            got = client.get(f"/v1/images/{created['id']}", headers=AUTH_A)
            assert got.status_code == 200, got.text
            view = got.json()
            assert view["state"] == "requested" and view["unavailable"] == ["task_cache", "search"]
            assert view["tasks"] is None and view["searchable"] is None
            found = client.get("/v1/search", headers=AUTH_A, params={"q": "x", "mode": "text"})
            assert found.status_code == 503
            assert found.json()["error"]["code"] == "search_unavailable"
    finally:
        server.shutdown()


@pytest.mark.slow
def test_a_dead_letter_too_large_for_its_topic_does_not_stop_a_projector(api_settings):
    settings = api_settings.model_copy(update={"projector_session_timeout_ms": 6000})
    runtime = build_runtime(settings, "cache", group_id=f"big-{uuid.uuid4().hex[:6]}")
    thread = threading.Thread(target=runtime.run, daemon=True)
    thread.start()
    topic = topic_name(settings.topic_prefix, "image")
    producer = Producer({"bootstrap.servers": settings.kafka_bootstrap})
    # Just under the producers' 1 MB limit: the letter, with its headers, is over it.
    producer.produce(topic, key=b"huge", value=b"\xff" + b"x" * 999_700)
    assert producer.flush(30) == 0
    try:
        dlq = dlq_topic(topic, "cache")
        deadline = time.monotonic() + 60
        letters = []
        while not letters and time.monotonic() < deadline:
            consumer = KafkaConsumer(bootstrap_servers=settings.kafka_bootstrap,
                                     auto_offset_reset="earliest", consumer_timeout_ms=2000)
            if dlq in consumer.topics():
                consumer.subscribe([dlq])
                letters = [m for m in consumer if m.key == b"huge"]
            consumer.close()
        assert letters, "no dead letter"
        assert dict(letters[0].headers)["payload_omitted"] == b"true"
        assert letters[0].value is None
        time.sleep(2)
        assert thread.is_alive() and runtime.health()["status"] == "ok"
    finally:
        runtime.stop.set()
        thread.join(30)


@pytest.mark.slow
def test_a_redis_out_of_memory_is_waited_out_not_dead_lettered(api_settings):
    server = OwnRedis()
    server.start()
    client = redis.Redis(port=server.port)
    client.config_set("maxmemory-policy", "noeviction")
    client.config_set("maxmemory", "1")  # every write is refused: OOM
    settings = api_settings.model_copy(update={
        "redis_url": f"redis://127.0.0.1:{server.port}/0", "projector_session_timeout_ms": 6000})
    runtime = build_runtime(settings, "cache", group_id=f"oom-{uuid.uuid4().hex[:6]}")
    thread = threading.Thread(target=runtime.run, daemon=True)
    thread.start()
    dead = metric("outbox_projector_dead_letters_total", projector="cache")
    topic = topic_name(settings.topic_prefix, "image")
    ids = [str(uuid.uuid4()) for _ in range(3)]
    producer = Producer({"bootstrap.servers": settings.kafka_bootstrap})
    for image_id in ids:
        producer.produce(topic, key=image_id.encode(), value=EventEnvelope(
            id=uuid.uuid4(), type="image.ocr_requested", aggregate_type="image",
            aggregate_id=image_id, aggregate_version=3, occurred_at=datetime.now(UTC),
            payload={"id": image_id, "state": "ocr_pending", "version": 3,
                     "attempts": 0}).to_json())
    assert producer.flush(30) == 0
    try:
        wait_for(lambda: runtime.health()["status"] == "sink_unavailable", timeout_s=60,
                 what="the outage noticed")
        # Longer than the bounded retries of a message that fails for its own reasons.
        time.sleep(6)
        assert metric("outbox_projector_dead_letters_total", projector="cache") == dead
        client.config_set("maxmemory", "0")
        keys = [f"{settings.redis_prefix}:task:{i}" for i in ids]
        wait_for(lambda: client.exists(*keys) == 3, timeout_s=60, what="applied after it")
        assert metric("outbox_projector_dead_letters_total", projector="cache") == dead
    finally:
        runtime.stop.set()
        thread.join(30)
        server.stop()


@pytest.mark.slow
def test_a_search_projector_started_while_the_search_server_is_down_waits_for_it():
    with isolated_settings("sdown") as real:
        server = TcpProxy()  # nothing listens on its port until it is started
        settings = real.model_copy(update={"es_url": f"http://127.0.0.1:{server.port}"})
        topic = topic_name(settings.topic_prefix, "image")
        admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap})
        for done in admin.create_topics([NewTopic(topic, 1, 1)]).values():
            done.result(30)
        # Set up with the search server down: nothing is reached before the first batch.
        runtime = build_runtime(settings, "search", group_id=f"sdown-{uuid.uuid4().hex[:6]}")
        thread = threading.Thread(target=runtime.run, daemon=True)
        thread.start()
        dead = metric("outbox_projector_dead_letters_total", projector="search")
        image_id = str(uuid.uuid4())
        producer = Producer({"bootstrap.servers": settings.kafka_bootstrap})
        producer.produce(topic, key=image_id.encode(), value=EventEnvelope(
            id=uuid.uuid4(), type="image.metadata_set", aggregate_type="image",
            aggregate_id=image_id, aggregate_version=2, occurred_at=datetime.now(UTC),
            payload={"id": image_id, "org_id": "org-a", "state": "ocr_pending",
                     "version": 2, "filename": "a.png"}).to_json())
        assert producer.flush(30) == 0
        es = Elasticsearch(real.es_url)
        try:
            wait_for(lambda: runtime.health()["status"] == "sink_unavailable", timeout_s=60,
                     what="the outage noticed")
            assert runtime.readiness()["ready"] is False
            server.start(upstream_port=int(real.es_url.rsplit(":", 1)[1]))
            wait_for(lambda: es.exists(index=real.es_index, id=image_id), timeout_s=60,
                     what="indexed once the search server is up")
            assert es.get(index=real.es_index, id=image_id)["_version"] == 2
            assert metric("outbox_projector_dead_letters_total", projector="search") == dead
        finally:
            runtime.stop.set()
            thread.join(30)
            server.stop()
            es.close()
