"""The wire format has one definition: what the relays encode is what the consumers decode."""

from __future__ import annotations

import json
import uuid
from datetime import datetime

import pytest
from kafka import KafkaConsumer, TopicPartition
from pydantic import ValidationError

from outbox import emit
from outbox.envelope import SCHEMA_VERSION, EventEnvelope, OutboxRecord
from outbox.kafka import topic_name
from tests.relay_harness import RelayProc, drop_slot_and_publication

PAYLOAD = {"title": "超市收据 \"quoted\" \\ back", "n": 7, "f": 1.5, "none": None,
           "nested": {"list": [1, "two", {"three": 3}], "empty": {}}, "emoji": "📷"}


@pytest.mark.parametrize("mode", ["logical", "poll"])
def test_what_the_relay_encodes_is_what_a_projector_decodes(mode, migrated, engine, tmp_path):
    with engine.begin() as conn:
        event_id = emit(conn, aggregate_type="doc", aggregate_id="agg-1", type="doc.saved",
                        payload=PAYLOAD, aggregate_version=3, org_id="org-x",
                        headers={"x-origin": "test"})
    relay = RelayProc(migrated.model_copy(update={"relay_poll_interval_s": 0.2}), mode,
                      tmp_path / "relay.log")
    try:
        consumer = KafkaConsumer(bootstrap_servers=migrated.kafka_bootstrap,
                                 enable_auto_commit=False, consumer_timeout_ms=30_000)
        topic = topic_name(migrated.topic_prefix, "doc")
        relay.wait_role("leader")
        parts = None
        while not parts:
            parts = consumer.partitions_for_topic(topic)
        consumer.assign([TopicPartition(topic, p) for p in parts])
        consumer.seek_to_beginning()
        msg = next(iter(consumer))
        consumer.close()
    finally:
        relay.stop()
        drop_slot_and_publication(migrated)
    env = EventEnvelope.from_json(msg.value)
    assert env.id == event_id
    assert (env.type, env.aggregate_type, env.aggregate_id, env.aggregate_version,
            env.org_id) == ("doc.saved", "doc", "agg-1", 3, "org-x")
    assert env.payload == PAYLOAD
    assert env.schema_version == SCHEMA_VERSION
    assert isinstance(env.occurred_at, datetime) and env.occurred_at.utcoffset() is not None
    assert msg.key == b"agg-1"
    headers = dict(msg.headers)
    assert headers["id"] == str(event_id).encode() and headers["type"] == b"doc.saved"
    assert headers["x-origin"] == b"test" and headers["traceparent"].startswith(b"00-")
    # Encoding the decoded envelope again gives the same JSON: one format, both ways.
    assert json.loads(env.to_json()) == json.loads(msg.value)


def test_record_and_envelope_encode_alike():
    record = OutboxRecord(id=str(uuid.uuid4()), aggregate_type="doc", aggregate_id="a",
                          type="doc.saved", aggregate_version=None, org_id=None,
                          payload_json=json.dumps(PAYLOAD, ensure_ascii=False),
                          headers_json="{}", occurred_at="2026-11-26T08:00:00.123456+00:00")
    env = EventEnvelope.from_json(record.value())
    again = env.to_json()
    # The envelope's fields are byte-identical; the payload is the database's JSON text as
    # it is (here with spaces), so it is compared parsed.
    head = record.value().split(b',"payload":')[0]
    assert again.split(b',"payload":')[0] == head
    assert json.loads(again) == json.loads(record.value())


def test_unknown_fields_are_ignored_and_a_foreign_schema_refused():
    base = {"id": str(uuid.uuid4()), "type": "t", "aggregate_type": "a", "aggregate_id": "1",
            "aggregate_version": 1, "org_id": None, "occurred_at": "2026-01-01T00:00:00Z",
            "schema": 1, "payload": {}}
    newer = EventEnvelope.from_json(json.dumps({**base, "partition_hint": 4, "tenant": "x"}))
    assert newer.aggregate_id == "1"
    with pytest.raises(ValidationError, match="schema 2 is not supported"):
        EventEnvelope.from_json(json.dumps({**base, "schema": 2}))
