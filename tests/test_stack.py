"""The local stack: every service reachable with the project's own clients."""

from __future__ import annotations

import subprocess
import time
import uuid
from pathlib import Path

import pytest
import requests
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic
from kafka import KafkaConsumer, TopicPartition
from sqlalchemy import text

from outbox_images.storage import s3_client

ROOT = Path(__file__).resolve().parent.parent


def test_postgres_has_logical_decoding(raw_engine):
    with raw_engine.connect() as conn:
        assert conn.execute(text("show wal_level")).scalar() == "logical"
        assert int(conn.execute(text("show max_replication_slots")).scalar()) >= 10
        assert conn.execute(text("show listen_addresses")).scalar() == "127.0.0.1"


def test_redis_round_trip(redis_client, uid):
    redis_client.set(f"t{uid}:k", "v", ex=60)
    assert redis_client.get(f"t{uid}:k") == b"v"


def _create_topic(bootstrap: str, topic: str, partitions: int = 3) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    for fut in admin.create_topics([NewTopic(topic, partitions, 1)]).values():
        fut.result(timeout=30)


def _read_all(bootstrap: str, topic: str, group: str, expect: int) -> list:
    consumer = KafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=group,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        session_timeout_ms=6000,
        heartbeat_interval_ms=1000,
        consumer_timeout_ms=15000,
    )
    out = []
    for msg in consumer:
        out.append(msg)
        if len(out) >= expect:
            break
    consumer.commit()
    consumer.close()
    return out


def test_confluent_produce_kafka_python_consume(base_settings, uid):
    topic = f"t{uid}.stack"
    _create_topic(base_settings.kafka_bootstrap, topic)
    producer = Producer(
        {"bootstrap.servers": base_settings.kafka_bootstrap, "enable.idempotence": True}
    )
    sent = {f"k{i}": f"v{i}".encode() for i in range(20)}
    for k, v in sent.items():
        producer.produce(topic, key=k, value=v, headers={"id": k})
    assert producer.flush(30) == 0
    msgs = _read_all(base_settings.kafka_bootstrap, topic, f"g{uid}", len(sent))
    assert {m.key.decode(): m.value for m in msgs} == sent
    assert all(dict(m.headers)["id"] == m.key for m in msgs)


def test_presigned_put_plain_http_and_tampered_signature(base_settings, uid):
    s3 = s3_client(base_settings)
    key = f"tests/{uid}/hello.bin"
    url = s3.generate_presigned_url(
        "put_object",
        Params={"Bucket": base_settings.s3_bucket, "Key": key, "ContentType": "image/png"},
        ExpiresIn=60,
    )
    body = uuid.uuid4().bytes * 100
    r = requests.put(url, data=body, headers={"Content-Type": "image/png"}, timeout=30)
    assert r.status_code == 200, r.text
    got = s3.get_object(Bucket=base_settings.s3_bucket, Key=key)["Body"].read()
    assert got == body

    sig_at = url.index("X-Amz-Signature=") + len("X-Amz-Signature=")
    flipped = "0" if url[sig_at] != "0" else "1"
    tampered = url[:sig_at] + flipped + url[sig_at + 1 :]
    r = requests.put(tampered, data=b"evil", headers={"Content-Type": "image/png"}, timeout=30)
    assert r.status_code == 403
    # A signature for one key does not open another.
    retargeted = url.replace(f"/{uid}/hello.bin", f"/{uid}/other.bin")
    r = requests.put(retargeted, data=b"evil", headers={"Content-Type": "image/png"}, timeout=30)
    assert r.status_code == 403
    unsigned = f"{base_settings.s3_endpoint}/{base_settings.s3_bucket}/{key}"
    assert requests.put(unsigned, data=b"evil", timeout=30).status_code == 403
    assert s3.get_object(Bucket=base_settings.s3_bucket, Key=key)["Body"].read() == body


def test_elasticsearch_index_and_search(es, uid):
    index = f"t{uid}-stack"
    es.indices.create(index=index, mappings={"properties": {"title": {"type": "text"}}})
    es.index(index=index, id="1", document={"title": "a receipt from the harbour cafe"})
    es.indices.refresh(index=index)
    hits = es.search(index=index, query={"match": {"title": "harbour"}})["hits"]["hits"]
    assert [h["_id"] for h in hits] == ["1"]
    es.indices.delete(index=index)


def _committed(bootstrap: str, topic: str, group: str) -> dict[int, int | None]:
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    try:
        parts = consumer.partitions_for_topic(topic) or set()
        return {p: consumer.committed(TopicPartition(topic, p)) for p in sorted(parts)}
    finally:
        consumer.close()


@pytest.mark.slow
def test_broker_restart_keeps_topics_and_committed_offsets(base_settings, uid):
    bootstrap = base_settings.kafka_bootstrap
    topic = f"t{uid}.durable"
    _create_topic(bootstrap, topic)
    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True})
    for i in range(30):
        producer.produce(topic, key=str(i), value=f"before-{i}".encode())
    assert producer.flush(30) == 0
    group = f"g{uid}"
    assert len(_read_all(bootstrap, topic, group, 30)) == 30
    before = _committed(bootstrap, topic, group)
    assert sum(v or 0 for v in before.values()) == 30

    subprocess.run([str(ROOT / "infra" / "stack.sh"), "restart-broker"], check=True)
    deadline = time.monotonic() + 30
    while True:
        try:
            after = _committed(bootstrap, topic, group)
            break
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
    assert after == before
    values = {m.value for m in _read_all(bootstrap, topic, f"g{uid}-fresh", 30)}
    assert values == {f"before-{i}".encode() for i in range(30)}
