"""The wire formats on the real broker: a relay (logical and poll) publishes in each format,
and an independent client (kafka-python, and the CloudEvents SDK for the cloudevents-*
formats) reads the exact bytes."""

from __future__ import annotations

import json
from datetime import datetime

import pytest
from cloudevents.v1.kafka import KafkaMessage, from_binary, from_structured
from kafka import KafkaConsumer, TopicPartition

from outbox import emit
from outbox.wire_formats import decode_record
from tests.relay_harness import RelayProc, drop_slot_and_publication

PAYLOAD = {"title": "超市收据 \"quoted\" \\ back", "n": 7, "f": 1.5, "none": None,
           "nested": {"list": [1, "two", {"three": 3}], "empty": {}}, "emoji": "📷"}


def _emit(engine, aggregate_type: str, aggregate_id: str) -> str:
    with engine.begin() as conn:
        return str(emit(conn, aggregate_type=aggregate_type, aggregate_id=aggregate_id,
                        type=f"{aggregate_type}.saved", payload=PAYLOAD, aggregate_version=3,
                        org_id="org-x", headers={"x-origin": "test"}))


def _first(settings, topic: str):
    consumer = KafkaConsumer(bootstrap_servers=settings.kafka_bootstrap,
                             enable_auto_commit=False, consumer_timeout_ms=30_000)
    try:
        parts = None
        while not parts:
            parts = consumer.partitions_for_topic(topic)
        consumer.assign([TopicPartition(topic, p) for p in parts])
        consumer.seek_to_beginning()
        return next(iter(consumer))
    finally:
        consumer.close()


def _relay(settings, mode: str, log_path, **env: str) -> RelayProc:
    relay = RelayProc(settings.model_copy(update={"relay_poll_interval_s": 0.2}), mode,
                      log_path, **env)
    relay.wait_role("leader")
    return relay


def _check_decoded(msg, event_id: str, aggregate_type: str) -> None:
    env = decode_record(msg.key, msg.value, msg.headers)
    assert (str(env.id), env.type, env.aggregate_type, env.aggregate_id,
            env.aggregate_version, env.org_id, env.payload) == (
        event_id, f"{aggregate_type}.saved", aggregate_type, "agg-1", 3, "org-x", PAYLOAD)


@pytest.mark.parametrize("mode", ["logical", "poll"])
@pytest.mark.parametrize("fmt", ["envelope", "debezium", "cloudevents-binary",
                                 "cloudevents-structured"])
def test_a_relay_publishes_each_format_as_specified(fmt, mode, migrated, engine, tmp_path):
    event_id = _emit(engine, "doc", "agg-1")
    dbz_topics = f"{migrated.topic_prefix}.dbz.${{routedByValue}}"
    relay = _relay(migrated, mode, tmp_path / "relay.log", OUTBOX_WIRE_FORMAT=fmt,
                   OUTBOX_DEBEZIUM_TOPIC_REPLACEMENT=dbz_topics)
    try:
        topic = (f"{migrated.topic_prefix}.dbz.doc" if fmt == "debezium"
                 else f"{migrated.topic_prefix}.doc")
        msg = _first(migrated, topic)
    finally:
        relay.stop()
        drop_slot_and_publication(migrated)
    assert msg.key == b"agg-1"
    headers = dict(msg.headers)
    assert len(headers) == len(msg.headers)  # no name twice
    traceparent = headers.get("traceparent") or headers.get("ce_traceparent")
    if fmt == "envelope":
        # The row's headers follow in jsonb's order.
        assert list(headers)[:2] == ["id", "type"]
        assert set(headers) == {"id", "type", "traceparent", "x-origin"}
        assert json.loads(msg.value)["payload"] == PAYLOAD
    elif fmt == "debezium":
        assert json.loads(msg.value) == PAYLOAD  # the payload itself
        assert list(headers)[:6] == ["id", "type", "aggregate_type", "aggregate_version",
                                     "org_id", "occurred_at"]
        assert set(list(headers)[6:]) == {"traceparent", "x-origin"}
        assert (headers["id"], headers["type"], headers["aggregate_type"],
                headers["aggregate_version"], headers["org_id"]) == (
            event_id.encode(), b"doc.saved", b"doc", b"3", b"org-x")
        assert datetime.fromisoformat(headers["occurred_at"].decode()).utcoffset() is not None
    else:
        message = KafkaMessage(headers=headers, key=msg.key, value=msg.value)
        if fmt == "cloudevents-binary":
            assert json.loads(msg.value) == PAYLOAD
            assert headers["content-type"] == b"application/json"
            assert headers["ce_specversion"] == b"1.0" and headers["x-origin"] == b"test"
            event = from_binary(message)
        else:
            assert list(headers) == ["content-type", "x-origin"]
            assert headers["content-type"] == b"application/cloudevents+json; charset=UTF-8"
            event = from_structured(message)
        attributes = event.get_attributes()
        assert (attributes["specversion"], attributes["id"], attributes["source"],
                attributes["type"], attributes["subject"], attributes["aggregatetype"],
                str(attributes["aggregateversion"]), attributes["orgid"]) == (
            "1.0", event_id, f"/outbox-sidecar/{migrated.db_schema}", "doc.saved", "agg-1",
            "doc", "3", "org-x")
        assert datetime.fromisoformat(attributes["time"]).utcoffset() is not None
        traceparent = attributes["traceparent"]
        assert event.get_data() == PAYLOAD
    assert traceparent is not None and traceparent.startswith(b"00-" if isinstance(
        traceparent, bytes) else "00-")
    _check_decoded(msg, event_id, "doc")


def test_an_aggregate_type_overrides_the_deployments_format(migrated, engine, tmp_path):
    doc_id = _emit(engine, "doc", "agg-1")
    order_id = _emit(engine, "order", "agg-1")
    relay = _relay(migrated, "logical", tmp_path / "relay.log",
                   OUTBOX_WIRE_FORMAT="cloudevents-structured",
                   OUTBOX_WIRE_FORMATS="order=debezium",
                   OUTBOX_DEBEZIUM_TOPIC_REPLACEMENT=f"{migrated.topic_prefix}.dbz."
                                                     "${routedByValue}")
    try:
        doc = _first(migrated, f"{migrated.topic_prefix}.doc")
        order = _first(migrated, f"{migrated.topic_prefix}.dbz.order")
    finally:
        relay.stop()
        drop_slot_and_publication(migrated)
    assert from_structured(KafkaMessage(headers=dict(doc.headers), key=doc.key,
                                        value=doc.value))["id"] == doc_id
    assert dict(order.headers)["id"] == order_id.encode() and json.loads(order.value) == PAYLOAD
    _check_decoded(doc, doc_id, "doc")
    _check_decoded(order, order_id, "order")
