"""The logical-decoding relay: a pgoutput slot read with the SQL decoding functions.

psycopg 3 has no streaming-replication API, so the relay peeks changes with
`pg_logical_slot_peek_binary_changes` through a server-side cursor (a huge transaction is
streamed in chunks, never held whole), publishes them, and calls
`pg_replication_slot_advance` only after Kafka acknowledged everything up to that commit.
An idle slot is advanced to a WAL position read *before* an empty peek (heartbeat), so it
never pins WAL and never skips a transaction that committed meanwhile.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import psycopg
import structlog
from psycopg.rows import dict_row

from outbox.db import ReconnectingConnection
from outbox.envelope import OutboxRecord, rfc3339
from outbox.pg_names import publication_name, slot_name
from outbox.settings import Settings
from relays.metrics import OLDEST_UNPUBLISHED_AGE, SLOT_LAG_BYTES
from relays.pgoutput import Begin, Commit, Insert, Relation, decode, int_to_lsn
from relays.publisher import BatchPublisher
from relays.record import SELECT_LIST, record_from_row

log = structlog.get_logger(__name__)

RECORD_FIELDS = ("id", "aggregate_type", "aggregate_id", "type", "aggregate_version", "org_id",
                 "payload", "headers", "created_at")

PEEK = """
select data from pg_logical_slot_peek_binary_changes(
    %(slot)s, %(upto)s::pg_lsn, %(n)s,
    'proto_version', '1', 'publication_names', %(publication)s)
"""


class LogicalRelay:
    """Reads committed outbox inserts from the slot and publishes them in commit order."""

    mode = "logical"

    def __init__(self, settings: Settings, dsn: str, publisher: BatchPublisher) -> None:
        self._settings = settings
        self._publisher = publisher
        self._schema = settings.db_schema
        self._slot = slot_name(self._schema)
        self._publication = publication_name(self._schema)
        self._db = ReconnectingConnection(dsn)
        # relation id -> positions of the record's fields in that relation's tuples
        self._positions: dict[int, tuple[int, ...]] = {}
        self._last_heartbeat = 0.0
        self._last_stats = 0.0

    @property
    def conn(self) -> psycopg.Connection:
        """The relay's database connection (reopened after a loss)."""
        return self._db.get()

    def setup(self) -> None:
        """Create the publication and the slot when absent."""
        conn = self.conn
        if not conn.execute("select 1 from pg_publication where pubname = %s",
                            (self._publication,)).fetchone():
            conn.execute(
                f'create publication "{self._publication}" for table "{self._schema}".outbox '
                "with (publish = 'insert')"
            )
            log.info("publication_created", publication=self._publication)
        if not conn.execute("select 1 from pg_replication_slots where slot_name = %s",
                            (self._slot,)).fetchone():
            conn.execute("delete from relay_slot where slot_name = %s", (self._slot,))
            conn.execute("select pg_create_logical_replication_slot(%s, 'pgoutput')",
                         (self._slot,))
            log.info("slot_created", slot=self._slot)
        # Creating the slot waited for every transaction older than its consistent point,
        # so the rows visible now bound what the slot cannot decode. Recorded once, so a
        # crash during the backfill repeats the same bounded backfill.
        conn.execute(
            "insert into relay_slot (slot_name, backfill_upto_seq) "
            "select %s, coalesce(max(seq), 0) from outbox on conflict (slot_name) do nothing",
            (self._slot,))
        upto, done = conn.execute(
            "select backfill_upto_seq, backfilled_at from relay_slot where slot_name = %s",
            (self._slot,)).fetchone()
        if done is None:
            self._backfill(upto)

    def _backfill(self, upto: int) -> None:
        """Publish the rows committed before the slot existed, which it cannot decode.

        Rows up to `upto` that committed after the slot's consistent point are sent twice
        (harmless), and always before the slot's stream, so per-aggregate order holds.
        """
        conn, last_seq, total = self.conn, 0, 0
        while True:
            with conn.cursor(row_factory=dict_row) as cur:
                rows = cur.execute(
                    f"select {SELECT_LIST} from outbox where published_at is null "
                    "and seq > %s and seq <= %s order by seq limit %s",
                    (last_seq, upto, self._settings.relay_batch_size)).fetchall()
            if not rows:
                break
            total += self._publisher.publish(record_from_row(r) for r in rows)
            last_seq = rows[-1]["seq"]
        conn.execute("update relay_slot set backfilled_at = now() where slot_name = %s",
                     (self._slot,))
        log.info("slot_backfilled", slot=self._slot, events=total, upto_seq=upto)

    def _records(self, cur: psycopg.Cursor, state: dict[str, object]) -> Iterator[OutboxRecord]:
        commit_time: float | None = None
        for (data,) in cur:
            msg = decode(bytes(data))
            if isinstance(msg, Insert):
                v = msg.values
                eid, agg_type, agg_id, etype, version, org, payload, headers, created = (
                    v[i] for i in self._positions[msg.relation_id])
                yield OutboxRecord(
                    id=eid or "",
                    aggregate_type=agg_type or "",
                    aggregate_id=agg_id or "",
                    type=etype or "",
                    aggregate_version=None if version is None else int(version),
                    org_id=org,
                    payload_json=payload or "null",
                    headers_json=headers or "{}",
                    occurred_at=rfc3339(created or ""),  # text in UTC: see libpq_dsn
                    commit_time=commit_time,
                )
            elif isinstance(msg, Begin):
                commit_time = msg.commit_time
                state.setdefault("first_commit_time", commit_time)
            elif isinstance(msg, Commit):
                state["end_lsn"] = msg.end_lsn
            elif isinstance(msg, Relation):
                self._positions[msg.relation_id] = tuple(
                    msg.columns.index(c) for c in RECORD_FIELDS)

    def run_once(self) -> int:
        """Publish one batch of committed transactions; 0 when there was nothing to do."""
        conn = self.conn
        # The flush position, not the write position: decoding only sees flushed WAL, and an
        # empty peek up to this point is what makes the heartbeat advance safe.
        target = conn.execute("select pg_current_wal_flush_lsn()::text").fetchone()[0]
        state: dict[str, object] = {}
        with conn.transaction(), conn.cursor(name="outbox_peek") as cur:
            cur.itersize = 2000
            cur.execute(PEEK, {"slot": self._slot, "upto": target,
                               "n": self._settings.relay_batch_size,
                               "publication": self._publication})
            count = self._publisher.publish(self._records(cur, state))
        end_lsn = state.get("end_lsn")
        if end_lsn is not None:
            # Every message up to this commit is acknowledged: now the slot may move.
            conn.execute("select pg_replication_slot_advance(%s, %s::pg_lsn)",
                         (self._slot, int_to_lsn(int(end_lsn))))
            log.debug("slot_advanced", events=count, lsn=int_to_lsn(int(end_lsn)))
            first = state.get("first_commit_time")
            OLDEST_UNPUBLISHED_AGE.set(max(0.0, time.time() - float(first)) if first else 0.0)
        else:
            OLDEST_UNPUBLISHED_AGE.set(0.0)
            self._heartbeat(target)
        self._refresh_stats()
        return count

    def _heartbeat(self, idle_lsn: str) -> None:
        """Nothing committed before `idle_lsn` is left: move the slot there."""
        now = time.monotonic()
        if now - self._last_heartbeat < self._settings.relay_heartbeat_s:
            return
        self._last_heartbeat = now
        self.conn.execute(
            "select pg_replication_slot_advance(slot_name, %s::pg_lsn) from pg_replication_slots"
            " where slot_name = %s and confirmed_flush_lsn < %s::pg_lsn",
            (idle_lsn, self._slot, idle_lsn),
        )

    def _refresh_stats(self) -> None:
        now = time.monotonic()
        if now - self._last_stats < 2.0:
            return
        self._last_stats = now
        row = self.conn.execute(
            "select pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::bigint"
            " from pg_replication_slots where slot_name = %s", (self._slot,)).fetchone()
        if row and row[0] is not None:
            SLOT_LAG_BYTES.set(row[0])

    def close(self) -> None:
        """Close the database connection (the slot stays, at its last advanced position)."""
        self._db.close()
