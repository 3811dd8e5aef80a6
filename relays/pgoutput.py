"""A decoder of pgoutput, PostgreSQL's logical replication output (PostgreSQL docs, "Logical
Replication Message Formats", protocol version 1), for the messages the relay reads: Begin,
Commit, Relation, Insert and Message. Pure functions on the bytes of one frame, no server.

They run on the hot path, once per frame: column values stay byte slices (the jsonb payload
is spliced into a record without being parsed), and a frame shorter than its own lengths
say raises `TruncatedFrame` instead of yielding a silently cut value.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from relays.replication import PG_EPOCH_OFFSET_US

BEGIN, COMMIT, INSERT, RELATION, MESSAGE = 0x42, 0x43, 0x49, 0x52, 0x4D

_BEGIN = struct.Struct(">Qqi")  # final LSN, commit time, xid
_COMMIT = struct.Struct(">BQQq")  # flags, commit LSN, end LSN, commit time
_FLAGS_LSN = struct.Struct(">BQ")
_U32 = struct.Struct(">I")
_U16 = struct.Struct(">H")


class TruncatedFrame(ValueError):
    """A frame ends before the lengths inside it say it does."""


class UnchangedToast:
    """A TOASTed value an UPDATE left as it was: pgoutput sends no bytes for it ('u')."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "UNCHANGED_TOAST"


UNCHANGED_TOAST = UnchangedToast()
Value = bytes | UnchangedToast | None


@dataclass(frozen=True)
class Begin:
    """A transaction's start: its commit record's LSN is known already (pgoutput sends a
    transaction only once it committed)."""

    final_lsn: int
    commit_time: float  # Unix seconds
    xid: int


@dataclass(frozen=True)
class Commit:
    """A transaction's end: `end_lsn` is where the stream resumes after it."""

    commit_lsn: int
    end_lsn: int
    commit_time: float


@dataclass(frozen=True)
class Relation:
    """A table's identity and column names, sent before its first row (and again after
    its definition changed)."""

    rel_id: int
    namespace: str
    name: str
    columns: tuple[str, ...]


@dataclass(frozen=True)
class Message:
    """A logical decoding message (`pg_logical_emit_message`)."""

    transactional: bool
    lsn: int
    prefix: bytes
    content: bytes


def _unix(pg_us: int) -> float:
    return (pg_us + PG_EPOCH_OFFSET_US) / 1e6


def decode_begin(msg: bytes) -> Begin:
    """A Begin ('B') frame."""
    try:
        final_lsn, pg_us, xid = _BEGIN.unpack_from(msg, 1)
    except struct.error as exc:
        raise TruncatedFrame(f"Begin: {exc}") from exc
    return Begin(final_lsn, _unix(pg_us), xid)


def decode_commit(msg: bytes) -> Commit:
    """A Commit ('C') frame."""
    try:
        _, commit_lsn, end_lsn, pg_us = _COMMIT.unpack_from(msg, 1)
    except struct.error as exc:
        raise TruncatedFrame(f"Commit: {exc}") from exc
    return Commit(commit_lsn, end_lsn, _unix(pg_us))


def _cstring(buf: bytes, pos: int) -> tuple[bytes, int]:
    end = buf.find(b"\x00", pos)
    if end < 0:
        raise TruncatedFrame("a string without its terminating zero byte")
    return buf[pos:end], end + 1


def decode_relation(msg: bytes) -> Relation:
    """A Relation ('R') frame: the relation id, schema, name and column names."""
    try:
        (rel_id,) = _U32.unpack_from(msg, 1)
        namespace, pos = _cstring(msg, 5)
        name, pos = _cstring(msg, pos)
        pos += 1  # replica identity
        (ncols,) = _U16.unpack_from(msg, pos)
        pos += 2
        columns = []
        for _ in range(ncols):
            column, pos = _cstring(msg, pos + 1)  # after the flags byte
            columns.append(column.decode())
            pos += 8  # type oid, type modifier
    except struct.error as exc:
        raise TruncatedFrame(f"Relation: {exc}") from exc
    if pos > len(msg):
        raise TruncatedFrame("Relation: a column's type is cut off")
    return Relation(rel_id, namespace.decode(), name.decode(), tuple(columns))


def insert_relation_id(msg: bytes) -> int:
    """The relation id of an Insert ('I') frame."""
    try:
        return _U32.unpack_from(msg, 1)[0]
    except struct.error as exc:
        raise TruncatedFrame(f"Insert: {exc}") from exc


def decode_insert(msg: bytes) -> list[Value]:
    """The new tuple of an Insert ('I') frame: one value per column, bytes in the text
    format (binary when the stream asked for it), None for NULL."""
    return decode_tuple(msg, 6)


def decode_tuple(msg: bytes, pos: int) -> list[Value]:
    """The column values of a TupleData at `pos`: byte slices, None for NULL, and
    UNCHANGED_TOAST for a TOASTed value an UPDATE did not change."""
    try:
        ncols = _U16.unpack_from(msg, pos)[0]
        pos += 2
        values: list[Value] = []
        append = values.append
        length_at = _U32.unpack_from
        for _ in range(ncols):
            kind = msg[pos]
            if kind == 0x74 or kind == 0x62:  # 't' text, 'b' binary
                start = pos + 5
                pos = start + length_at(msg, pos + 1)[0]
                append(msg[start:pos])
            elif kind == 0x6E:  # 'n'
                append(None)
                pos += 1
            elif kind == 0x75:  # 'u'
                append(UNCHANGED_TOAST)
                pos += 1
            else:
                raise TruncatedFrame(f"unknown column kind {kind:#x} at byte {pos}")
    except (struct.error, IndexError) as exc:
        raise TruncatedFrame(f"TupleData: {exc}") from exc
    if pos > len(msg):  # a slice past the end is cut short, not an error: check once
        raise TruncatedFrame(f"TupleData: {pos - len(msg)} bytes missing at the end")
    return values


def decode_message(msg: bytes) -> Message:
    """A logical decoding Message ('M') frame (protocol version 1: no xid)."""
    try:
        flags, lsn = _FLAGS_LSN.unpack_from(msg, 1)
        prefix, pos = _cstring(msg, 10)
        (length,) = _U32.unpack_from(msg, pos)
    except struct.error as exc:
        raise TruncatedFrame(f"Message: {exc}") from exc
    content = msg[pos + 4:pos + 4 + length]
    if len(content) != length:
        raise TruncatedFrame(f"Message: {length - len(content)} bytes of content missing")
    return Message(bool(flags & 1), lsn, prefix, content)
