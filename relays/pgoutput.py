"""Decoding PostgreSQL's pgoutput logical replication messages (protocol version 1).

Only what the relay needs: Begin, Relation, Insert and Commit. Other messages (Origin, Type,
Update, Delete, Truncate) are recognised and skipped. Reference: PostgreSQL docs,
"Logical Replication Message Formats".
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

# Microseconds between the Unix epoch and PostgreSQL's epoch (2000-01-01).
PG_EPOCH_OFFSET_US = 946_684_800_000_000


class DecodeError(ValueError):
    """A message that does not follow the pgoutput format."""


@dataclass(frozen=True, slots=True)
class Begin:
    """A transaction starts (its commit position and time are already known)."""

    final_lsn: int
    commit_time: float  # Unix epoch seconds
    xid: int


@dataclass(frozen=True, slots=True)
class Commit:
    """A transaction ends; `end_lsn` is where the slot may advance to."""

    commit_lsn: int
    end_lsn: int
    commit_time: float


@dataclass(frozen=True, slots=True)
class Relation:
    """The column layout of a table, sent before its first row in a session."""

    relation_id: int
    namespace: str
    name: str
    columns: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Insert:
    """One inserted row, in the column order of its Relation."""

    relation_id: int
    values: tuple[str | None, ...]  # text form; None for SQL NULL


Message = Begin | Commit | Relation | Insert | None

_Q = struct.Struct(">Q")
_I = struct.Struct(">I")
_H = struct.Struct(">H")
_q = struct.Struct(">q")


def _pg_time(us: int) -> float:
    return (us + PG_EPOCH_OFFSET_US) / 1_000_000


def _cstring(buf: bytes, pos: int) -> tuple[str, int]:
    end = buf.index(b"\x00", pos)
    return buf[pos:end].decode(), end + 1


def _tuple(buf: bytes, pos: int) -> tuple[tuple[str | None, ...], int]:
    # The relay's hot loop: locals and int.from_bytes beat struct calls per column.
    ncols = int.from_bytes(buf[pos : pos + 2], "big")
    pos += 2
    values: list[str | None] = []
    append = values.append
    for _ in range(ncols):
        kind = buf[pos]
        if kind == 0x74:  # 't': text value
            length = int.from_bytes(buf[pos + 1 : pos + 5], "big")
            start = pos + 5
            pos = start + length
            append(buf[start:pos].decode())
        elif kind in (0x6E, 0x75):  # 'n' null, 'u' unchanged TOAST (not in inserts)
            append(None)
            pos += 1
        else:
            raise DecodeError(f"unknown tuple column kind {kind!r}")
    return tuple(values), pos


def decode(buf: bytes) -> Message:
    """Decode one pgoutput message; None for message kinds the relay does not use."""
    if not buf:
        raise DecodeError("empty message")
    tag = buf[0]
    try:
        if tag == 0x42:  # 'B'
            final_lsn, ts = _Q.unpack_from(buf, 1)[0], _q.unpack_from(buf, 9)[0]
            return Begin(final_lsn, _pg_time(ts), _I.unpack_from(buf, 17)[0])
        if tag == 0x43:  # 'C': flags int8, commit lsn, end lsn, commit time
            commit_lsn, end_lsn = _Q.unpack_from(buf, 2)[0], _Q.unpack_from(buf, 10)[0]
            return Commit(commit_lsn, end_lsn, _pg_time(_q.unpack_from(buf, 18)[0]))
        if tag == 0x52:  # 'R'
            (rel_id,) = _I.unpack_from(buf, 1)
            namespace, pos = _cstring(buf, 5)
            name, pos = _cstring(buf, pos)
            pos += 1  # replica identity setting
            (ncols,) = _H.unpack_from(buf, pos)
            pos += 2
            columns = []
            for _ in range(ncols):
                pos += 1  # flags
                col, pos = _cstring(buf, pos)
                pos += 8  # type oid, type modifier
                columns.append(col)
            return Relation(rel_id, namespace, name, tuple(columns))
        if tag == 0x49:  # 'I': relation id, 'N', tuple
            (rel_id,) = _I.unpack_from(buf, 1)
            if buf[5] != 0x4E:
                raise DecodeError("insert without a new tuple")
            values, _ = _tuple(buf, 6)
            return Insert(rel_id, values)
    except (struct.error, IndexError, UnicodeDecodeError) as exc:
        raise DecodeError(f"truncated or invalid {chr(tag)!r} message") from exc
    if tag in b"OYUDTM":  # origin, type, update, delete, truncate, logical message
        return None
    raise DecodeError(f"unknown pgoutput message {chr(tag)!r}")


def int_to_lsn(value: int) -> str:
    """integer -> `16/B374D848`."""
    return f"{value >> 32:X}/{value & 0xFFFFFFFF:X}"
