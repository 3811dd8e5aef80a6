"""Wire formats: how an outbox event is laid out in a Kafka record, chosen per deployment
(`OUTBOX_WIRE_FORMAT`) and per aggregate type (`OUTBOX_WIRE_FORMATS`).

- `envelope`: the JSON envelope of `outbox/envelope.py`, topic `<prefix>.<aggregate_type>`.
- `debezium`: what Debezium's outbox event router emits with `table.expand.json.payload=true`:
  topic from `debezium_topic_replacement`, value = the payload itself, the event id in the
  `id` header and the other fields as headers (`table.fields.additional.placement`).
- `cloudevents-binary` / `cloudevents-structured`: the CloudEvents 1.0 Kafka protocol binding,
  topic `<prefix>.<aggregate_type>`, with `traceparent` as the distributed-tracing extension.

Every format keys a record by its aggregate id and splices the payload JSON as the database
wrote it (never parsed on the way out). One decoder reads all four, detecting the format of
each record, so a topic whose format changed midway still replays.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson
from pydantic import ValidationError

from outbox.envelope import EventEnvelope, OutboxRecord, encode_value, kafka_headers
from outbox.kafka import topic_name
from outbox.settings import Settings, WireFormat

Header = tuple[str, bytes]
# (event id, type, aggregate type, aggregate id, aggregate version, org id, occurred at
#  (RFC 3339), payload JSON, the row's headers JSON) -> (value, headers)
Encode = Callable[[str, str, str, str, int | None, str | None, str, bytes, "str | bytes | None"],
                  tuple[bytes, list[Header]]]

ROUTED_BY_VALUE = "${routedByValue}"
CE_SPECVERSION = "1.0"
CE_STRUCTURED_CONTENT_TYPE = "application/cloudevents+json; charset=UTF-8"
JSON_CONTENT_TYPE = "application/json"
# The debezium format's headers named after the outbox columns they come from.
DEBEZIUM_HEADERS = ("id", "type", "aggregate_type", "aggregate_version", "org_id",
                    "occurred_at")
# The row headers that become CloudEvents attributes (the distributed-tracing extension).
CE_TRACE_EXTENSIONS = ("traceparent", "tracestate")


class UndecodableRecord(ValueError):
    """A Kafka record that is no event in any wire format; the message says why."""


def format_of(settings: Settings, aggregate_type: str) -> WireFormat:
    """The wire format of `aggregate_type`'s events: its override, else the deployment's."""
    return settings.wire_formats.get(aggregate_type, settings.wire_format)


def event_topic(settings: Settings, aggregate_type: str) -> str:
    """The topic of `aggregate_type`'s events: `<prefix>.<aggregate_type>`, or for the
    debezium format `debezium_topic_replacement` with `${routedByValue}` = the type."""
    if format_of(settings, aggregate_type) == "debezium":
        return settings.debezium_topic_replacement.replace(ROUTED_BY_VALUE, aggregate_type)
    return topic_name(settings.topic_prefix, aggregate_type)


def is_event_topic(settings: Settings, name: str) -> bool:
    """Whether `name` is an event topic of these settings (or one of its dead-letter topics):
    `<prefix>.*`, or a debezium topic when some aggregate type uses that format."""
    if name.startswith(settings.topic_prefix + "."):
        return True
    if "debezium" not in (settings.wire_format, *settings.wire_formats.values()):
        return False
    pattern = re.escape(settings.debezium_topic_replacement).replace(
        re.escape(ROUTED_BY_VALUE), r"[A-Za-z0-9._-]+")
    return re.fullmatch(pattern + r"(\.dlq\..+)?", name) is not None


def cloudevents_source(settings: Settings) -> str:
    """The CloudEvents `source` attribute: the setting, else `/outbox-sidecar/<db_schema>`."""
    return settings.cloudevents_source or f"/outbox-sidecar/{settings.db_schema}"


def _row_headers(headers_json: str | bytes | None) -> dict[str, Any]:
    extra = orjson.loads(headers_json) if headers_json else {}
    return extra if isinstance(extra, dict) else {}  # a row written by hand may hold null


def encode_envelope(event_id: str, event_type: str, aggregate_type: str, aggregate_id: str,
                    aggregate_version: int | None, org_id: str | None, occurred_at: str,
                    payload_json: bytes, headers_json: str | bytes | None
                    ) -> tuple[bytes, list[Header]]:
    """The `envelope` format: the JSON envelope; headers `id`, `type`, then the row's."""
    value = encode_value(id=event_id, type=event_type, aggregate_type=aggregate_type,
                         aggregate_id=aggregate_id, aggregate_version=aggregate_version,
                         org_id=org_id, occurred_at=occurred_at, payload_json=payload_json)
    return value, kafka_headers(event_id, event_type, headers_json)


def encode_debezium(event_id: str, event_type: str, aggregate_type: str, aggregate_id: str,
                    aggregate_version: int | None, org_id: str | None, occurred_at: str,
                    payload_json: bytes, headers_json: str | bytes | None
                    ) -> tuple[bytes, list[Header]]:
    """The `debezium` format: value = the payload; the fields as headers (a null field has
    none), then the row's headers."""
    headers = [("id", event_id.encode()), ("type", event_type.encode()),
               ("aggregate_type", aggregate_type.encode())]
    if aggregate_version is not None:
        headers.append(("aggregate_version", str(aggregate_version).encode()))
    if org_id is not None:
        headers.append(("org_id", org_id.encode()))
    headers.append(("occurred_at", occurred_at.encode()))
    headers += [(k, str(v).encode()) for k, v in _row_headers(headers_json).items()
                if k not in DEBEZIUM_HEADERS]
    return payload_json, headers


def _ce_attributes(source: str, event_id: str, event_type: str, aggregate_type: str,
                   aggregate_id: str, aggregate_version: int | None, org_id: str | None,
                   occurred_at: str, extra: dict[str, Any]) -> dict[str, Any]:
    attributes: dict[str, Any] = {
        "specversion": CE_SPECVERSION, "id": event_id, "source": source, "type": event_type,
        "subject": aggregate_id, "time": occurred_at, "aggregatetype": aggregate_type}
    if aggregate_version is not None:
        attributes["aggregateversion"] = aggregate_version
    if org_id is not None:
        attributes["orgid"] = org_id
    for name in CE_TRACE_EXTENSIONS:
        if extra.get(name) is not None:
            attributes[name] = str(extra[name])
    return attributes


def _passed_through(extra: dict[str, Any]) -> list[Header]:
    """The row's other headers, as plain Kafka headers (never mistaken for attributes)."""
    return [(k, str(v).encode()) for k, v in extra.items()
            if k not in CE_TRACE_EXTENSIONS and k != "content-type" and not k.startswith("ce_")]


def _ce_binary(attributes: dict[str, Any], payload_json: bytes, extra: dict[str, Any]
               ) -> tuple[bytes, list[Header]]:
    """`cloudevents-binary`: `ce_*` headers, value = the payload."""
    headers = [(f"ce_{k}", str(v).encode()) for k, v in attributes.items()]
    headers.append(("content-type", JSON_CONTENT_TYPE.encode()))
    return payload_json, headers + _passed_through(extra)


def _ce_structured(attributes: dict[str, Any], payload_json: bytes, extra: dict[str, Any]
                   ) -> tuple[bytes, list[Header]]:
    """`cloudevents-structured`: the JSON event, payload as `data`."""
    head = orjson.dumps({**attributes, "datacontenttype": JSON_CONTENT_TYPE})
    value = b"".join((head[:-1], b',"data":', payload_json, b"}"))
    return value, [("content-type", CE_STRUCTURED_CONTENT_TYPE.encode()),
                   *_passed_through(extra)]


def cloudevents_encoder(source: str, structured: bool) -> Encode:
    """The `cloudevents-binary` (or, with `structured`, `cloudevents-structured`) format of
    `source`."""
    lay_out = _ce_structured if structured else _ce_binary

    def encode(event_id: str, event_type: str, aggregate_type: str, aggregate_id: str,
               aggregate_version: int | None, org_id: str | None, occurred_at: str,
               payload_json: bytes, headers_json: str | bytes | None
               ) -> tuple[bytes, list[Header]]:
        extra = _row_headers(headers_json)
        attributes = _ce_attributes(source, event_id, event_type, aggregate_type,
                                    aggregate_id, aggregate_version, org_id, occurred_at, extra)
        return lay_out(attributes, payload_json, extra)

    return encode


@dataclass(frozen=True, slots=True)
class Route:
    """Where and how the events of one aggregate type are written."""

    format: WireFormat
    topic: str
    encode: Encode


def route(settings: Settings, aggregate_type: str) -> Route:
    """The route of `aggregate_type`'s events under `settings`."""
    fmt = format_of(settings, aggregate_type)
    encode: Encode
    if fmt == "envelope":
        encode = encode_envelope
    elif fmt == "debezium":
        encode = encode_debezium
    elif fmt == "cloudevents-binary":
        encode = cloudevents_encoder(cloudevents_source(settings), structured=False)
    else:
        encode = cloudevents_encoder(cloudevents_source(settings), structured=True)
    return Route(fmt, event_topic(settings, aggregate_type), encode)


HeaderList = Iterable[tuple[str, bytes | None]] | None


def _header_map(headers: HeaderList) -> dict[str, str]:
    """Headers by name, the first of each name (a dead letter puts its own first)."""
    named: dict[str, str] = {}
    for key, value in headers or ():
        if key not in named and value is not None:
            named[key] = value.decode("utf-8", "replace")
    return named


def _is_structured(named: Mapping[str, str]) -> bool:
    return named.get("content-type", "").lower().startswith("application/cloudevents")


def _validated(fmt: str, fields: dict[str, Any]) -> EventEnvelope:
    try:
        return EventEnvelope.model_validate(fields)
    except ValidationError as exc:
        raise UndecodableRecord(f"{fmt}: {exc}") from exc


def _payload(fmt: str, value: bytes | None) -> Any:
    try:
        return orjson.loads(value or b"")
    except orjson.JSONDecodeError as exc:
        raise UndecodableRecord(f"{fmt}: the value is not JSON ({exc})") from exc


def _require(fmt: str, named: Mapping[str, str], names: Iterable[str]) -> None:
    missing = [n for n in names if n not in named]
    if missing:
        raise UndecodableRecord(f"{fmt}: no header {', '.join(missing)}")


def _text(key: bytes | str | None) -> str | None:
    return key.decode("utf-8", "replace") if isinstance(key, bytes) else key


def _decode_ce_binary(named: Mapping[str, str], key: bytes | str | None,
                      value: bytes | None) -> EventEnvelope:
    fmt = "cloudevents-binary"
    if named["ce_specversion"] != CE_SPECVERSION:
        raise UndecodableRecord(f"{fmt}: specversion {named['ce_specversion']!r} is not "
                                f"{CE_SPECVERSION}")
    _require(fmt, named, ("ce_id", "ce_type", "ce_time", "ce_aggregatetype"))
    content_type = named.get("content-type", JSON_CONTENT_TYPE).split(";")[0].strip().lower()
    if content_type != JSON_CONTENT_TYPE and not content_type.endswith("+json"):
        raise UndecodableRecord(f"{fmt}: data of content type {content_type!r} is not a "
                                "JSON payload")
    return _validated(fmt, {
        "id": named["ce_id"], "type": named["ce_type"],
        "aggregate_type": named["ce_aggregatetype"],
        "aggregate_id": named.get("ce_subject") or _text(key),
        "aggregate_version": named.get("ce_aggregateversion"), "org_id": named.get("ce_orgid"),
        "occurred_at": named["ce_time"], "payload": _payload(fmt, value)})


def _decode_ce_structured(key: bytes | str | None, value: bytes | None) -> EventEnvelope:
    fmt = "cloudevents-structured"
    event = _payload(fmt, value)
    if not isinstance(event, dict):
        raise UndecodableRecord(f"{fmt}: the value is not a JSON object")
    if event.get("specversion") != CE_SPECVERSION:
        raise UndecodableRecord(f"{fmt}: specversion {event.get('specversion')!r} is not "
                                f"{CE_SPECVERSION}")
    missing = [n for n in ("id", "type", "time", "aggregatetype", "data") if n not in event]
    if missing:
        raise UndecodableRecord(f"{fmt}: no attribute {', '.join(missing)}"
                                + (" (data_base64 is no JSON payload)"
                                   if "data_base64" in event else ""))
    return _validated(fmt, {
        "id": event["id"], "type": event["type"], "aggregate_type": event["aggregatetype"],
        "aggregate_id": event.get("subject") or _text(key),
        "aggregate_version": event.get("aggregateversion"), "org_id": event.get("orgid"),
        "occurred_at": event["time"], "payload": event["data"]})


def _decode_debezium(named: Mapping[str, str], key: bytes | str | None,
                     value: bytes | None) -> EventEnvelope:
    fmt = "debezium"
    _require(fmt, named, ("id", "type", "aggregate_type", "occurred_at"))
    if key is None:
        raise UndecodableRecord(f"{fmt}: no key (the aggregate id)")
    return _validated(fmt, {
        "id": named["id"], "type": named["type"], "aggregate_type": named["aggregate_type"],
        "aggregate_id": _text(key), "aggregate_version": named.get("aggregate_version"),
        "org_id": named.get("org_id"), "occurred_at": named["occurred_at"],
        "payload": _payload(fmt, value)})


def decode_record(key: bytes | str | None, value: bytes | None,
                  headers: HeaderList) -> EventEnvelope:
    """The event in a Kafka record of any wire format. Raises UndecodableRecord (a
    ValueError) saying why when the record is no event."""
    named = _header_map(headers)
    if "ce_specversion" in named:
        return _decode_ce_binary(named, key, value)
    if _is_structured(named):
        return _decode_ce_structured(key, value)
    if value is None:
        raise UndecodableRecord("the record has no value")
    try:
        envelope = EventEnvelope.from_json(value)
    except ValidationError as exc:
        if "id" not in named:
            raise UndecodableRecord(f"envelope: {exc}") from exc
        try:
            return _decode_debezium(named, key, value)
        except UndecodableRecord as not_debezium:
            raise UndecodableRecord(f"neither an envelope ({exc.error_count()} errors, first: "
                                    f"{exc.errors()[0]['msg']}) nor {not_debezium}") from exc
    if "id" in named and named["id"].lower() != str(envelope.id):
        return _decode_debezium(named, key, value)  # a payload that looks like an envelope
    return envelope


# Where each field is found: (header, CloudEvents header, envelope key, CloudEvents key).
_FIELDS = {
    "id": ("id", "ce_id", "id", "id"),
    "type": ("type", "ce_type", "type", "type"),
    "org_id": ("org_id", "ce_orgid", "org_id", "orgid"),
    "traceparent": ("traceparent", "ce_traceparent", None, "traceparent"),
}


def record_field(headers: HeaderList, value: bytes | None, name: str) -> str | None:
    """One of `id`, `type`, `org_id`, `traceparent` of a record of any wire format, read
    from the headers when they carry it (no parsing), else from the value; None when the
    record does not say (or is undecodable)."""
    header, ce_header, envelope_key, ce_key = _FIELDS[name]
    named = _header_map(headers)
    for h in (header, ce_header):
        if h in named:
            return named[h]
    structured = _is_structured(named)
    if not structured and (envelope_key is None or "ce_specversion" in named):
        return None
    try:
        doc = orjson.loads(value or b"")
    except orjson.JSONDecodeError:
        return None
    if not isinstance(doc, dict):
        return None
    if structured:
        found = doc.get(ce_key)
    elif "id" in named and doc.get("id") != named["id"]:
        return None  # a debezium record: its value is the payload, not the event
    else:
        found = doc.get(envelope_key)
    return found if isinstance(found, str) else None


def encode_record(route: Route, rec: OutboxRecord) -> tuple[bytes, list[Header]]:
    """An outbox record's value and headers in its route's format."""
    return route.encode(rec.id, rec.type, rec.aggregate_type, rec.aggregate_id,
                        rec.aggregate_version, rec.org_id, rec.occurred_at,
                        rec.payload_json.encode(), rec.headers_json)
