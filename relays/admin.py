"""Operating the relay: `outbox relay status` and `outbox relay drop`."""

from __future__ import annotations

import time
from typing import Any

import psycopg
from psycopg.rows import dict_row

from outbox.db import libpq_dsn
from outbox.emit_mode import NO_ROWS_NOTE, stored_emit_mode
from outbox.pg_names import publication_name, relay_lock_name, slot_name
from outbox.settings import Settings
from relays.checkpointer import kafka_position, transactional_id
from relays.election import LeaderLock
from relays.logical import LogicalRelay
from relays.publisher import BatchPublisher, PublishError
from relays.replication import int_to_lsn, lsn_to_int


def _delivery(settings: Settings) -> dict[str, Any]:
    """The relay's delivery mode and, exactly-once, the position Kafka holds (None when
    Kafka cannot be read: the rest of the report does not depend on it)."""
    txn_id = transactional_id(settings, libpq_dsn(settings))
    if txn_id is None:
        return {"mode": "at-least-once"}
    try:
        position = kafka_position(settings, txn_id)
    except PublishError as exc:
        position = {"error": str(exc)}
    return {"mode": "exactly-once", "transactional_id": txn_id, "kafka_position": position}


class RelayBusy(RuntimeError):
    """A relay holds the lock: it must be stopped before the slot can be dropped."""


def relay_status(settings: Settings) -> dict[str, Any]:
    """The slot (position, lag, retained WAL, health), the publication's tables, the relay's
    record of what Kafka acknowledged, the leader, and what waits to be published."""
    schema = settings.db_schema
    params = {"slot": slot_name(schema), "pub": publication_name(schema),
              "lock": relay_lock_name(schema)}
    with psycopg.connect(libpq_dsn(settings), row_factory=dict_row) as conn:
        slot = conn.execute(
            "select slot_name, active, active_pid, wal_status, confirmed_flush_lsn::text,"
            " restart_lsn::text,"
            " pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::bigint as lag_bytes,"
            " pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::bigint"
            " as retained_wal_bytes from pg_replication_slots where slot_name = %(slot)s",
            params).fetchone()
        tables = [f"{r['schemaname']}.{r['tablename']}" for r in conn.execute(
            "select schemaname, tablename from pg_publication_tables where pubname = %(pub)s"
            " order by 1, 2", params)]
        publication = conn.execute("select pubname, pubinsert from pg_publication"
                                   " where pubname = %(pub)s", params).fetchone()
        leader = conn.execute(
            "select a.pid, a.client_addr::text, a.application_name, a.backend_start"
            " from pg_locks l join pg_stat_activity a using (pid)"
            " where l.locktype = 'advisory' and l.granted"
            " and ((l.classid::bigint << 32) | l.objid::bigint) = hashtextextended(%(lock)s, 0)",
            params).fetchone()
        record = conn.execute(
            "select consistent_lsn, backfilled_at, acked_lsn, acked_commit_at, acked_seq"
            " from relay_slot where slot_name = %(slot)s", params).fetchone()
        waiting = conn.execute(
            "select count(*) as rows, extract(epoch from now() - min(created_at)) as oldest_s"
            " from outbox where published_at is null and seq > coalesce("
            "(select acked_seq from relay_slot where slot_name = %(slot)s), 0)",
            params).fetchone()
        mode = stored_emit_mode(conn)
    if record:
        record = {**record, "consistent_lsn": int_to_lsn(record["consistent_lsn"]),
                  "acked_lsn": int_to_lsn(record["acked_lsn"])}
    covered = f"{schema}.outbox" in tables
    problems = []
    if slot is None:
        problems.append("no slot (the logical relay makes it when it starts)")
    elif slot["wal_status"] == "lost":
        problems.append("the slot is invalidated: the relay will recreate it with a backfill")
    if publication is None or not covered:
        problems.append("the publication does not cover the outbox")
    if leader is None:
        problems.append("no relay holds the lock")
    return {"schema": schema, "slot": slot, "publication": {
        "name": params["pub"], "exists": publication is not None, "tables": tables,
        "covers_outbox": covered}, "leader": leader, "acknowledged": record,
        "emit_mode": mode, "delivery": _delivery(settings),
        # Message mode writes no rows: what waits is in the WAL only (see the slot's lag).
        "unpublished_estimate": waiting, "estimate_note": NO_ROWS_NOTE if mode == "message"
        else None, "problems": problems}


def drop_relay(settings: Settings) -> dict[str, Any]:
    """Retire logical decoding for this outbox without losing or repeating anything: with
    no relay running, publish what the slot still holds, mark every row committed before
    that point published (so a polling relay starts after them), then drop the slot, the
    publication and the relay's record. Raises RelayBusy while a relay holds the lock."""
    dsn = libpq_dsn(settings)
    lock = LeaderLock(dsn, relay_lock_name(settings.db_schema))
    if not lock.acquire(lambda: False, poll_s=0.0, attempts=1):
        raise RelayBusy("a relay is running for this outbox: stop it first")
    try:
        publisher = BatchPublisher(settings, stop_requested=lambda: False,
                                   transactional_id=transactional_id(settings, dsn))
        relay = LogicalRelay(settings, dsn, publisher)
        try:
            with psycopg.connect(dsn) as conn:
                # No insert can commit until this transaction ends, so `upto` is final.
                conn.execute("lock table outbox in share mode")
                upto = conn.execute("select pg_current_wal_flush_lsn()::text").fetchone()[0]
                drained = _drain(relay, upto)
                marked = conn.execute("update outbox set published_at = now()"
                                      " where published_at is null").rowcount
                conn.commit()
        finally:
            relay.close()
            publisher.close()
        with psycopg.connect(dsn, autocommit=True) as conn:
            slot = slot_name(settings.db_schema)
            _wait_until_released(conn, slot)
            conn.execute("select pg_drop_replication_slot(slot_name) from pg_replication_slots"
                         " where slot_name = %s", (slot,))
            conn.execute(f'drop publication if exists "{publication_name(settings.db_schema)}"')
            conn.execute("delete from relay_slot where slot_name = %s", (slot,))
        return {"published_before_drop": drained, "rows_marked_published": marked,
                "dropped_at_lsn": upto}
    finally:
        lock.release()


def _wait_until_released(conn: psycopg.Connection, slot: str, timeout_s: float = 10.0) -> None:
    """Wait until no walsender holds `slot`: the one that streamed it for the drain ends a
    moment after its connection closed, and until then the slot cannot be dropped ("is
    active for PID ..."). After `timeout_s` the drop is tried anyway and says who holds it."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        row = conn.execute("select active_pid from pg_replication_slots where slot_name = %s",
                           (slot,)).fetchone()
        if row is None or row[0] is None:
            return
        time.sleep(0.05)


def _drain(relay: LogicalRelay, upto: str, timeout_s: float = 300.0) -> int:
    """Publish from the slot until its acknowledged position reaches `upto`."""
    target, total = lsn_to_int(upto), 0
    relay.setup()
    deadline = time.monotonic() + timeout_s
    while relay.acked_lsn < target:
        if time.monotonic() > deadline:
            raise TimeoutError(f"the slot did not reach {upto} in {timeout_s:.0f}s")
        total += relay.run_once()
    return total
