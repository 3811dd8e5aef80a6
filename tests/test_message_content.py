"""The content format of events written as logical-decoding messages (no server needed)."""

from __future__ import annotations

import struct
from typing import Any

import orjson
import pytest

from outbox.message_content import BadMessageContent, decode_content
from relays.logical_messages import NotTransactional, message_row

FIELDS = {"id": "5f0c6d1e-8a51-4c43-9d7e-1b2a3c4d5e6f", "aggregate_type": "order",
          "aggregate_id": "o-1", "type": "order.created", "aggregate_version": 3,
          "org_id": "acme", "headers": {"traceparent": "00-" + "a" * 32 + "-" + "b" * 16 + "-01"},
          "occurred_at": "2026-11-22 12:00:00.500000+00"}


def encode_content(*, id: str, aggregate_type: str, aggregate_id: str, type: str,
                   aggregate_version: int | None, org_id: str | None,
                   headers: dict[str, Any], occurred_at: str, payload_json: bytes) -> bytes:
    """The content `outbox_emit` writes in SQL for these fields (its format, in Python)."""
    if b"\n" in payload_json:
        # Compact JSON needs no raw newline; one here would end the head early.
        payload_json = orjson.dumps(orjson.loads(payload_json))
    head = orjson.dumps({
        "v": 1, "id": id, "aggregate_type": aggregate_type,
        "aggregate_id": aggregate_id, "type": type, "aggregate_version": aggregate_version,
        "org_id": org_id, "headers": headers, "occurred_at": occurred_at})
    return head + b"\n" + payload_json


ODD_PAYLOADS = [
    b"{}", b"[]", b"null", b"42", b'"text"',
    b'{"text": "line one\\nline two", "emoji": "\xf0\x9f\x98\x80", "zh": "\xe4\xb8\xad"}',
    b'{"nested": {"a": [1, 2.5, null, true]}, "quote": "\\"", "nul_escape": "\\u0000"}',
    b'{"big": ' + b"9" * 40 + b"}",
]


@pytest.mark.parametrize("payload", ODD_PAYLOADS)
def test_round_trip_keeps_the_payload_text(payload):
    decoded = decode_content(encode_content(**FIELDS, payload_json=payload))
    assert decoded.payload_json == payload  # spliced as it is, never re-encoded
    assert (decoded.id, decoded.aggregate_version, decoded.org_id, decoded.headers) == (
        FIELDS["id"], 3, "acme", FIELDS["headers"])


def test_a_payload_with_a_raw_newline_is_compacted_not_cut():
    payload = b'{\n  "a": "x"\n}'
    decoded = decode_content(encode_content(**FIELDS, payload_json=payload))
    assert orjson.loads(decoded.payload_json) == {"a": "x"}


def test_nulls_round_trip():
    fields = {**FIELDS, "aggregate_version": None, "org_id": None, "headers": {}}
    decoded = decode_content(encode_content(**fields, payload_json=b"{}"))
    assert decoded.aggregate_version is None and decoded.org_id is None


@pytest.mark.parametrize("content", [b"no separator", b"[1]\n{}", b'{"v": 2}\n{}',
                                     b'{"v": 1, "id": "x"}\n{}', b"not json\n{}"])
def test_foreign_content_is_refused(content):
    with pytest.raises(BadMessageContent):
        decode_content(content)


def _pgoutput_message(prefix: bytes, content: bytes, transactional: bool = True) -> bytes:
    return (b"M" + struct.pack(">BQ", int(transactional), 0x16B374D848) + prefix + b"\x00"
            + struct.pack(">I", len(content)) + content)


def test_a_message_frame_becomes_an_outbox_row():
    content = encode_content(**FIELDS, payload_json=b'{"total": 10}')
    row = message_row(_pgoutput_message(b"outbox_emit:s", content), b"outbox_emit:s")
    assert row == (None, FIELDS["id"].encode(), b"order", b"o-1", b"order.created", b"3",
                   b"acme", b'{"total": 10}', orjson.dumps(FIELDS["headers"]),
                   FIELDS["occurred_at"].encode())


def test_other_prefixes_are_skipped_and_non_transactional_refused():
    content = encode_content(**FIELDS, payload_json=b"{}")
    assert message_row(_pgoutput_message(b"outbox_emit:other", content), b"outbox_emit:s") is None
    assert message_row(_pgoutput_message(b"outbox_emit:s2", content), b"outbox_emit:s") is None
    with pytest.raises(NotTransactional, match="16/B374D848"):
        message_row(_pgoutput_message(b"outbox_emit:s", content, transactional=False),
                    b"outbox_emit:s")
