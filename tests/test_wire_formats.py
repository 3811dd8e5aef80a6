"""The four wire formats without a server: what each encoder writes, that the one decoder
reads every format back (detecting it per record), and the errors of records that are no
event."""

from __future__ import annotations

import json
import uuid

import orjson
import pytest
from pydantic import ValidationError

from outbox.envelope import EventEnvelope, OutboxRecord
from outbox.settings import Settings
from outbox.wire_formats import (
    UndecodableRecord,
    cloudevents_source,
    decode_record,
    encode_record,
    event_topic,
    is_event_topic,
    record_field,
    route,
)

FORMATS = ("envelope", "debezium", "cloudevents-binary", "cloudevents-structured")
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
PAYLOAD_JSON = '{"title": "超市收据 \\"q\\" \\\\", "n": 7, "nested": {"l": [1, {"x": null}]}}'


def _record(**changes: object) -> OutboxRecord:
    fields: dict[str, object] = dict(
        id=str(uuid.uuid4()), aggregate_type="doc", aggregate_id="agg-1", type="doc.saved",
        aggregate_version=3, org_id="org-x", payload_json=PAYLOAD_JSON,
        headers_json=json.dumps({"traceparent": TRACEPARENT, "x-origin": "test"}),
        occurred_at="2026-11-22T12:00:00.5+00:00")
    fields.update(changes)
    return OutboxRecord(**fields)  # type: ignore[arg-type]


def _settings(fmt: str, **more: object) -> Settings:
    return Settings(wire_format=fmt, topic_prefix="px", db_schema="shop", **more)


def _encoded(fmt: str, rec: OutboxRecord) -> tuple[str, bytes, list[tuple[str, bytes]]]:
    r = route(_settings(fmt), rec.aggregate_type)
    value, headers = encode_record(r, rec)
    return r.topic, value, headers


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_decodes_to_the_event_it_encoded(fmt):
    rec = _record()
    _, value, headers = _encoded(fmt, rec)
    env = decode_record(b"agg-1", value, headers)
    assert (str(env.id), env.type, env.aggregate_type, env.aggregate_id, env.aggregate_version,
            env.org_id) == (rec.id, "doc.saved", "doc", "agg-1", 3, "org-x")
    assert env.occurred_at.isoformat() == "2026-11-22T12:00:00.500000+00:00"
    assert env.payload == json.loads(PAYLOAD_JSON)
    assert record_field(headers, value, "traceparent") == TRACEPARENT
    assert record_field(headers, value, "id") == rec.id
    assert record_field(headers, value, "org_id") == "org-x"
    assert record_field(headers, value, "type") == "doc.saved"


@pytest.mark.parametrize("fmt", FORMATS)
def test_null_fields_and_no_row_headers(fmt):
    rec = _record(aggregate_version=None, org_id=None, headers_json="null")
    _, value, headers = _encoded(fmt, rec)
    env = decode_record(b"agg-1", value, headers)
    assert (env.aggregate_version, env.org_id) == (None, None)
    assert record_field(headers, value, "traceparent") is None
    assert record_field(headers, value, "org_id") is None


def test_envelope_bytes_are_those_of_the_envelope_module():
    rec = _record()
    topic, value, headers = _encoded("envelope", rec)
    assert (topic, value, headers) == ("px.doc", rec.value(), rec.kafka_headers())


def test_debezium_layout():
    rec = _record()
    topic, value, headers = _encoded("debezium", rec)
    assert topic == "outbox.event.doc"
    assert value == PAYLOAD_JSON.encode()  # spliced as the database wrote it
    assert headers == [("id", rec.id.encode()), ("type", b"doc.saved"),
                       ("aggregate_type", b"doc"), ("aggregate_version", b"3"),
                       ("org_id", b"org-x"), ("occurred_at", b"2026-11-22T12:00:00.5+00:00"),
                       ("traceparent", TRACEPARENT.encode()), ("x-origin", b"test")]


def test_cloudevents_binary_layout():
    rec = _record()
    topic, value, headers = _encoded("cloudevents-binary", rec)
    assert topic == "px.doc" and value == PAYLOAD_JSON.encode()
    assert headers == [
        ("ce_specversion", b"1.0"), ("ce_id", rec.id.encode()),
        ("ce_source", b"/outbox-sidecar/shop"),
        ("ce_type", b"doc.saved"), ("ce_subject", b"agg-1"),
        ("ce_time", b"2026-11-22T12:00:00.5+00:00"), ("ce_aggregatetype", b"doc"),
        ("ce_aggregateversion", b"3"), ("ce_orgid", b"org-x"),
        ("ce_traceparent", TRACEPARENT.encode()), ("content-type", b"application/json"),
        ("x-origin", b"test")]


def test_cloudevents_structured_layout():
    rec = _record()
    topic, value, headers = _encoded("cloudevents-structured", rec)
    assert topic == "px.doc"
    assert headers == [("content-type", b"application/cloudevents+json; charset=UTF-8"),
                       ("x-origin", b"test")]
    assert value.endswith(b',"data":' + PAYLOAD_JSON.encode() + b"}")
    assert orjson.loads(value) == {
        "specversion": "1.0", "id": rec.id, "source": "/outbox-sidecar/shop",
        "type": "doc.saved", "subject": "agg-1", "time": "2026-11-22T12:00:00.5+00:00",
        "aggregatetype": "doc", "aggregateversion": 3, "orgid": "org-x",
        "traceparent": TRACEPARENT, "datacontenttype": "application/json",
        "data": json.loads(PAYLOAD_JSON)}


def test_row_headers_cannot_pose_as_attributes():
    rec = _record(headers_json=json.dumps({"ce_id": "forged", "content-type": "text/plain",
                                           "id": "forged", "aggregate_type": "forged"}))
    for fmt in FORMATS:
        _, value, headers = _encoded(fmt, rec)
        assert str(decode_record(b"agg-1", value, headers).id) == rec.id, fmt
        assert decode_record(b"agg-1", value, headers).aggregate_type == "doc", fmt


def test_topics_per_format_and_per_aggregate_type():
    s = _settings("cloudevents-binary", wire_formats={"order": "debezium"},
                  debezium_topic_replacement="shop.${routedByValue}.events")
    assert event_topic(s, "doc") == "px.doc"
    assert event_topic(s, "order") == "shop.order.events"
    assert route(s, "order").format == "debezium" and route(s, "doc").format == \
        "cloudevents-binary"
    assert is_event_topic(s, "shop.order.events") and is_event_topic(s, "px.doc.dlq.search")
    assert is_event_topic(s, "shop.order.events.dlq.relay")
    assert not is_event_topic(s, "shop.order") and not is_event_topic(s, "other.doc")
    assert not is_event_topic(_settings("envelope"), "outbox.event.doc")
    assert cloudevents_source(s) == "/outbox-sidecar/shop"
    assert cloudevents_source(_settings("envelope", cloudevents_source="urn:x")) == "urn:x"


def test_per_aggregate_type_setting_from_the_environment(monkeypatch):
    monkeypatch.setenv("OUTBOX_WIRE_FORMATS", "order=debezium, image = cloudevents-binary")
    assert Settings().wire_formats == {"order": "debezium", "image": "cloudevents-binary"}
    monkeypatch.setenv("OUTBOX_WIRE_FORMATS", '{"order": "cloudevents-structured"}')
    assert Settings().wire_formats == {"order": "cloudevents-structured"}
    for bad in ("order", "order=xml", "=debezium", '{"order": '):
        monkeypatch.setenv("OUTBOX_WIRE_FORMATS", bad)
        with pytest.raises(ValidationError, match="wire_formats"):
            Settings()


def test_a_topic_whose_format_changed_midway_decodes_record_by_record():
    events = [_record(aggregate_version=v) for v in range(4)]
    log = [_encoded(fmt, rec)[1:] for fmt, rec in zip(FORMATS, events, strict=True)]
    got = [decode_record(b"agg-1", value, headers) for value, headers in log]
    assert [(str(e.id), e.aggregate_version) for e in got] == \
        [(r.id, r.aggregate_version) for r in events]


def test_a_debezium_payload_that_looks_like_an_envelope_is_a_payload():
    inner = _record()
    rec = _record(payload_json=EventEnvelope.from_json(inner.value()).to_json().decode())
    _, value, headers = _encoded("debezium", rec)
    env = decode_record(b"agg-1", value, headers)
    assert str(env.id) == rec.id and env.payload["id"] == inner.id
    assert record_field(headers, value, "org_id") == "org-x"


def test_an_envelope_without_headers_still_decodes():
    rec = _record()
    assert str(decode_record(None, rec.value(), None).id) == rec.id


@pytest.mark.parametrize(("key", "value", "headers", "reason"), [
    (b"k", b"\xff not json", [], "envelope: "),
    (b"k", b'{"id": "nope"}', [], "envelope: "),
    (b"k", None, [], "no value"),
    (b"k", b'{"a": 1}', [("id", str(uuid.UUID(int=1)).encode())],
     "nor debezium: no header type, aggregate_type, occurred_at"),
    (None, b'{"a": 1}', [("id", str(uuid.UUID(int=1)).encode()), ("type", b"t"),
                         ("aggregate_type", b"a"), ("occurred_at", b"2026-01-01T00:00:00Z")],
     "no key"),
    (b"k", b"[1, 2]", [("id", str(uuid.UUID(int=1)).encode()), ("type", b"t"),
                       ("aggregate_type", b"a"), ("occurred_at", b"2026-01-01T00:00:00Z")],
     "payload"),
    (b"k", b"{}", [("ce_specversion", b"0.3")], "specversion '0.3'"),
    (b"k", b"{}", [("ce_specversion", b"1.0"), ("ce_id", b"x")],
     "no header ce_type, ce_time, ce_aggregatetype"),
    (b"k", b"<a/>", [("ce_specversion", b"1.0"), ("ce_id", b"x"), ("ce_type", b"t"),
                     ("ce_time", b"2026-01-01T00:00:00Z"), ("ce_aggregatetype", b"a"),
                     ("content-type", b"application/xml")], "content type 'application/xml'"),
    (b"k", b"{}", [("ce_specversion", b"1.0"), ("ce_id", b"not-a-uuid"), ("ce_type", b"t"),
                   ("ce_time", b"2026-01-01T00:00:00Z"), ("ce_aggregatetype", b"a")],
     "cloudevents-binary: "),
    (b"k", b"not json", [("content-type", b"application/cloudevents+json")],
     "the value is not JSON"),
    (b"k", b'{"specversion": "1.0", "id": "x", "type": "t", "time": "2026-01-01T00:00:00Z",'
           b' "aggregatetype": "a", "data_base64": "AA=="}',
     [("content-type", b"application/cloudevents+json")], "data_base64"),
    (b"k", b'"just a string"', [("content-type", b"application/cloudevents+json")],
     "not a JSON object"),
])
def test_records_that_are_no_event_say_why(key, value, headers, reason):
    with pytest.raises(UndecodableRecord) as caught:
        decode_record(key, value, headers)
    assert reason in str(caught.value)
    assert isinstance(caught.value, ValueError)  # what the runtime dead-letters
