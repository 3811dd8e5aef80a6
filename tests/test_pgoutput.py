"""The pgoutput decoder (relays/pgoutput.py) on frames a real PostgreSQL 15 sent.

The frames are in tests/data/pgoutput/<case>.json, recorded once by
tests/data/pgoutput/record.py (its docstring says how): each is one pgoutput message (protocol
version 1) as `pg_logical_slot_peek_binary_changes` returned it, with the LSN and xid the
server gave it. No server is needed here: the tests use no fixture of tests/conftest.py.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import orjson
import pytest

from outbox.pg_names import message_prefix
from relays.logical_messages import NotTransactional, message_row
from relays.pgoutput import (
    BEGIN,
    COMMIT,
    INSERT,
    MESSAGE,
    RELATION,
    UNCHANGED_TOAST,
    Begin,
    Commit,
    Message,
    Relation,
    TruncatedFrame,
    decode_begin,
    decode_commit,
    decode_insert,
    decode_message,
    decode_relation,
    decode_tuple,
    insert_relation_id,
)

DATA = Path(__file__).resolve().parent / "data" / "pgoutput"
CASES = ("inserts", "nulls", "toast", "relation_change", "messages", "outbox_message")
UPDATE = ord("U")
OUTBOX_SCHEMA = "pgoutput_frames"  # record.py's outbox schema


@dataclass(frozen=True)
class Frame:
    """One recorded pgoutput message and where the server said it was."""

    lsn: int
    xid: int
    data: bytes

    @property
    def kind(self) -> str:
        return chr(self.data[0])


def _lsn(text: str) -> int:
    high, low = text.split("/")
    return int(high, 16) << 32 | int(low, 16)


@cache
def _recording(case: str) -> tuple[dict[str, Any], tuple[Frame, ...]]:
    recorded = json.loads((DATA / f"{case}.json").read_text())
    frames = tuple(Frame(_lsn(f["lsn"]), f["xid"], bytes.fromhex(f["hex"]))
                   for f in recorded["frames"])
    return recorded, frames


def _kinds(frames: tuple[Frame, ...]) -> str:
    return "".join(f.kind for f in frames)


@pytest.mark.parametrize("case", CASES)
def test_transactions_are_consistent(case: str) -> None:
    """Every Begin has its Commit, with the same commit LSN and time, the xid the server
    gave the frames between them, an end LSN where the server says the Commit is, a commit
    time just before the recording, and the commits in LSN order."""
    recorded, frames = _recording(case)
    opened: tuple[Frame, Begin] | None = None
    last_end = 0
    for frame in frames:
        if frame.data[0] == BEGIN:
            assert opened is None, "a Begin inside a transaction"
            begin = decode_begin(frame.data)
            assert begin.xid == frame.xid
            opened = (frame, begin)
        elif frame.data[0] == COMMIT:
            assert opened is not None, "a Commit without its Begin"
            begin_frame, begin = opened
            commit = decode_commit(frame.data)
            assert commit.commit_lsn == begin.final_lsn
            assert begin_frame.lsn <= commit.commit_lsn < commit.end_lsn == frame.lsn
            assert commit.end_lsn > last_end
            assert commit.commit_time == begin.commit_time
            assert recorded["recorded_at"] - 60 < commit.commit_time <= recorded["recorded_at"]
            last_end = commit.end_lsn
            opened = None
        elif opened is not None:
            # A change or transactional message of this transaction, before its commit (a
            # message's LSN is its record's end: the commit record's start when it is last).
            assert frame.xid == opened[1].xid
            assert opened[0].lsn <= frame.lsn <= opened[1].final_lsn
        else:
            assert frame.data[0] == MESSAGE and frame.xid == 0  # only those stand alone
    assert opened is None, "a Begin without its Commit"


def test_two_inserts_decode_exactly() -> None:
    """Begin, Relation, Insert, Insert, Commit: the relation's identity and columns, and
    each value byte for byte in PostgreSQL's text output (jsonb normalised, timestamptz in
    the session's UTC, UTF-8 text as is)."""
    recorded, frames = _recording("inserts")
    assert _kinds(frames) == "BRIIC"
    oid = recorded["relation_oids"]["frames_events"]
    assert decode_relation(frames[1].data) == Relation(
        oid, "public", "frames_events", ("id", "n", "doc", "at"))
    assert [insert_relation_id(f.data) for f in frames[2:4]] == [oid, oid]
    assert decode_insert(frames[2].data) == [
        b"a-1", b"42", b'{"a": "x", "b": [1, 2.50]}', b"2024-05-06 05:08:09.123456+00"]
    assert decode_insert(frames[3].data) == [
        "é ✓".encode(), b"-7", b'"just a string"', b"2024-02-29 23:59:59+00"]
    begin, commit = decode_begin(frames[0].data), decode_commit(frames[4].data)
    assert begin == Begin(commit.commit_lsn, commit.commit_time, frames[0].xid)
    assert commit == Commit(begin.final_lsn, frames[4].lsn, begin.commit_time)


def test_null_columns_are_none() -> None:
    """NULL ('n') decodes to None, and an empty text stays b"" (a zero-length 't')."""
    _, frames = _recording("nulls")
    assert _kinds(frames) == "BRIC"
    assert decode_relation(frames[1].data).columns == ("id", "a", "b", "c", "d")
    assert decode_insert(frames[2].data) == [b"1", None, None, None, b""]


def test_unchanged_toast_in_an_update() -> None:
    """An UPDATE of another column sends no bytes for an out-of-line TOASTed value: 'u',
    decoded as UNCHANGED_TOAST; the Insert before it carried the whole value."""
    recorded, frames = _recording("toast")
    assert _kinds(frames) == "BRICBUC"
    oid = recorded["relation_oids"]["frames_toast"]
    assert decode_relation(frames[1].data) == Relation(
        oid, "public", "frames_toast", ("id", "note", "big"))
    chain = "".join(hashlib.md5(str(i).encode()).hexdigest() for i in range(1, 401)).encode()
    assert decode_insert(frames[2].data) == [b"1", b"first", chain]

    update = frames[5].data
    assert update[0] == UPDATE
    assert int.from_bytes(update[1:5], "big") == oid
    # REPLICA IDENTITY DEFAULT and an unchanged key: no old tuple ('K'/'O'), 'N' at byte 5.
    assert update[5:6] == b"N"
    values = decode_tuple(update, 6)
    assert values == [b"1", b"second", UNCHANGED_TOAST]
    assert values[2] is UNCHANGED_TOAST


def test_relation_sent_again_after_its_definition_changed() -> None:
    """After ALTER TABLE ... ADD COLUMN (a transaction that sends no frame), the next
    transaction sends the same relation id again, with the new columns, before its Insert."""
    recorded, frames = _recording("relation_change")
    assert _kinds(frames) == "BRICBRIC"
    oid = recorded["relation_oids"]["frames_evolving"]
    before, after = decode_relation(frames[1].data), decode_relation(frames[5].data)
    assert before == Relation(oid, "public", "frames_evolving", ("id", "a"))
    assert after == Relation(oid, "public", "frames_evolving", ("id", "a", "b"))
    assert frames[3].lsn < frames[5].lsn  # after the first transaction's Commit
    assert decode_insert(frames[2].data) == [b"1", b"one"]
    second = decode_insert(frames[6].data)
    assert insert_relation_id(frames[6].data) == after.rel_id
    assert len(second) == len(after.columns) == 3
    assert dict(zip(after.columns, second, strict=True)) == {"id": b"2", "a": b"two", "b": b"2"}


def test_logical_decoding_messages() -> None:
    """Transactional messages arrive inside their transaction, a non-transactional one on
    its own; each decodes to its flag, the LSN `pg_logical_emit_message` returned, its
    prefix and its content (bytes, a zero byte included)."""
    recorded, frames = _recording("messages")
    assert _kinds(frames) == "BMMCM"
    emitted = [_lsn(lsn) for lsn in recorded["results"]]
    assert [decode_message(frames[i].data) for i in (1, 2, 4)] == [
        Message(True, emitted[0], b"p", b"content"),
        Message(True, emitted[1], b"p2", b"\x00\xff\x00"),
        Message(False, emitted[2], b"p", b"content"),
    ]
    assert [frames[i].lsn for i in (1, 2, 4)] == emitted
    assert frames[4].xid == 0


def test_outbox_message_row() -> None:
    """`message_row` on the message `outbox_emit` wrote in message mode: the outbox row's
    values; None for another prefix; NotTransactional for a non-transactional one."""
    recorded, frames = _recording("outbox_message")
    assert _kinds(frames) == "BMCM"
    prefix = message_prefix(OUTBOX_SCHEMA).encode()
    row = message_row(frames[1].data, prefix)
    assert row is not None
    event_id = recorded["results"][0].encode()
    occurred_at = row[9]
    assert row == (None, event_id, b"order", b"o-1", b"order.created", b"3", b"org-9",
                   b'{"items": [1, 2], "total": 12.50}',
                   orjson.dumps({"traceparent":
                                 "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}),
                   occurred_at)
    assert re.fullmatch(rb"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{6}\+00", occurred_at)
    assert message_row(frames[1].data, b"outbox_emit:another_schema") is None
    with pytest.raises(NotTransactional) as raised:
        message_row(frames[3].data, prefix)
    assert raised.value.lsn == frames[3].lsn == _lsn(recorded["results"][1])


def _update_tuple(msg: bytes) -> list:
    return decode_tuple(msg, 6)


DECODERS: dict[int, Callable[[bytes], object]] = {
    BEGIN: decode_begin, COMMIT: decode_commit, RELATION: decode_relation,
    INSERT: decode_insert, MESSAGE: decode_message, UPDATE: _update_tuple,
}
ALL_FRAMES = [(case, i) for case in CASES for i in range(len(_recording(case)[1]))]


def _prefix_lengths(size: int) -> list[int]:
    """Every length shorter than the frame for a short one; for a long one, the first and
    last 256 and a sample between (the middle of a long value is like any other byte)."""
    if size <= 1024:
        return list(range(size))
    return sorted({*range(256), *range(256, size - 256, 61), *range(size - 256, size)})


@pytest.mark.parametrize(("case", "index"), ALL_FRAMES,
                         ids=[f"{case}-{i}-{_recording(case)[1][i].kind}"
                              for case, i in ALL_FRAMES])
def test_truncated_frames_raise(case: str, index: int) -> None:
    """Every frame cut short raises TruncatedFrame from its kind's decoder: never a value
    cut short, never IndexError or struct.error. No shorter prefix of these kinds is a
    complete frame, so every one must raise."""
    data = _recording(case)[1][index].data
    decode = DECODERS[data[0]]
    decode(data)  # the whole frame decodes
    for size in _prefix_lengths(len(data)):
        with pytest.raises(TruncatedFrame):
            decode(data[:size])
    if data[0] == INSERT:
        for size in range(5):
            with pytest.raises(TruncatedFrame):
                insert_relation_id(data[:size])
