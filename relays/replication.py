"""A client of PostgreSQL's streaming replication protocol, for one logical slot.

psycopg 3 has no replication API, but a `replication=database` connection accepts the
replication commands through `execute()`; after `START_REPLICATION` the connection is in
COPY BOTH mode, and the copy data is read and written with `pgconn.get_copy_data()` and
`put_copy_data()`. The frames are written by hand (PostgreSQL docs, "Streaming Replication
Protocol"): XLogData `w`, primary keepalive `k`, standby status update `r`.

Chosen over psycopg2's `LogicalReplicationConnection`: the same protocol without a second
driver, and the relay reads frames as memoryviews with no per-message Python object.
"""

from __future__ import annotations

import select
import struct
import time
from dataclasses import dataclass

import psycopg
from psycopg import pq

# Microseconds between the Unix epoch and PostgreSQL's epoch (2000-01-01).
PG_EPOCH_OFFSET_US = 946_684_800_000_000

_XLOG_HEADER = struct.Struct(">cQQq")  # 'w', data start, WAL end, send time
_KEEPALIVE = struct.Struct(">cQqB")  # 'k', WAL end, send time, reply requested
_STATUS = struct.Struct(">cQQQqB")  # 'r', written, flushed, applied, client time, reply


class ReplicationError(RuntimeError):
    """The server ended the stream or refused a command."""


def lsn_to_int(lsn: str) -> int:
    """`16/B374D848` -> integer."""
    high, low = lsn.split("/")
    return (int(high, 16) << 32) | int(low, 16)


def int_to_lsn(value: int) -> str:
    """integer -> `16/B374D848`."""
    return f"{value >> 32:X}/{value & 0xFFFFFFFF:X}"


def pg_now_us() -> int:
    """Now, in microseconds since PostgreSQL's epoch."""
    return int(time.time() * 1_000_000) - PG_EPOCH_OFFSET_US


@dataclass(frozen=True)
class CreatedSlot:
    """A slot made by CREATE_REPLICATION_SLOT; `snapshot` stays importable until the next
    command on the connection that created it."""

    consistent_point: int
    snapshot: str | None


class ReplicationConnection:
    """One `replication=database` connection: slot commands, then one stream."""

    def __init__(self, dsn: str) -> None:
        self._conn = psycopg.connect(dsn, replication="database", autocommit=True)
        self._pg = self._conn.pgconn
        self.server_wal_end = 0  # how far the server said it has decoded (keepalives)
        self.request_status = False  # the server asked for a status update
        self._flushed = 0  # the last position sent

    def create_slot(self, slot: str, export_snapshot: bool) -> CreatedSlot:
        """Create a pgoutput slot; with `export_snapshot`, the snapshot of its consistent
        point is exported, so the rows committed before the slot can be read exactly."""
        option = "export" if export_snapshot else "nothing"
        row = self._conn.execute(
            f"CREATE_REPLICATION_SLOT \"{slot}\" LOGICAL pgoutput (SNAPSHOT '{option}')"
        ).fetchone()
        assert row is not None
        return CreatedSlot(lsn_to_int(row[1]), row[2])

    def start(self, slot: str, publication: str, start_lsn: int) -> None:
        """Start streaming the slot's changes from `start_lsn` (0: from where the slot is)."""
        self._conn.execute(
            f'START_REPLICATION SLOT "{slot}" LOGICAL {int_to_lsn(start_lsn)} '
            f"(proto_version '1', publication_names '\"{publication}\"', messages 'true')")
        if self._pg.status != pq.ConnStatus.OK:
            raise ReplicationError("the server refused START_REPLICATION")

    def read(self, timeout_s: float) -> bytes | None:
        """The pgoutput message of the next XLogData frame, waiting at most `timeout_s`;
        None when nothing came. Keepalives are noted here (see `server_wal_end`), and
        answered when they ask for it."""
        deadline = time.monotonic() + timeout_s
        while True:
            nbytes, data = self._pg.get_copy_data(1)
            if nbytes == 0:
                # Even with no time left, what already reached the socket is taken: a batch
                # ends when the server has sent nothing more, not when libpq's buffer is empty.
                remaining = max(0.0, deadline - time.monotonic())
                ready, _, _ = select.select([self._pg.socket], [], [], remaining)
                if not ready:
                    return None
                self._pg.consume_input()
                continue
            if nbytes < 0:
                message = self._pg.get_result()
                error = message.error_message.decode(errors="replace") if message else ""
                raise ReplicationError(f"the replication stream ended: {error.strip()}")
            kind = data[0]
            if kind == 0x77:  # 'w': the header (start, WAL end, time) is not needed
                return bytes(data[_XLOG_HEADER.size:])
            if kind == 0x6B:  # 'k'
                # A keepalive's position is how far the server has decoded: every commit
                # before it that touched the publication was sent before this frame.
                _, wal_end, _, reply = _KEEPALIVE.unpack_from(data)
                self.server_wal_end = max(self.server_wal_end, wal_end)
                if reply:
                    # Answered at once with the last position given, even in the middle of
                    # a long batch: a server left without an answer ends the stream after
                    # wal_sender_timeout. The caller answers with a newer one after the batch.
                    self.send_status(self._flushed)
                    self.request_status = True

    def send_status(self, flushed: int, reply: bool = False) -> None:
        """Tell the server every change up to `flushed` is durable downstream: the slot's
        confirmed position moves there, and WAL before it may be recycled. With `reply`,
        the server answers with a keepalive that says how far it has decoded."""
        frame = _STATUS.pack(b"r", flushed, flushed, flushed, pg_now_us(), int(reply))
        if self._pg.put_copy_data(frame) != 1 or self._pg.flush() != 0:
            raise ReplicationError("could not send the standby status update")
        self._flushed = flushed
        self.request_status = False

    def close(self) -> None:
        """Close the connection (the server ends the stream)."""
        self._conn.close()
