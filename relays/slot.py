"""The logical relay's slot and publication: made, checked, healed and recorded.

A slot is (re)created through the replication protocol with an exported snapshot: the rows
visible in that snapshot committed before the slot's consistent point and are published
from the table (the backfill), everything after comes from the stream, so no row is both.
The relay records in `relay_slot` what Kafka acknowledged last; the slot's confirmed
position never passes that record, so a slot that did (someone else made it) is foreign.

The slot is recreated, with a backfill, when it is missing, invalidated (`wal_status =
'lost'`), foreign, half made (the backfill never finished), or when the publication no
longer is the one it was made for: a table that left the publication, even for a moment,
had inserts the stream will never carry. The backfill of a recreated slot starts
`relay_backfill_margin_s` before the last acknowledged commit, so only a transaction open
longer than that margin could be missed; rows already published in that window are sent
again (duplicates, never loss).

The publication is the owner's (the third core migration makes it, `outbox migrate`
repairs it): a least-privileged relay only checks it, and waits while it is missing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

import psycopg
import structlog
from psycopg.rows import dict_row

from outbox.db import ReconnectingConnection
from outbox.pg_names import OUTBOX_TABLE, publication_name, slot_name
from outbox.publication import ensure_publication_sql
from outbox.settings import Settings
from relays.metrics import SLOT_RECREATIONS
from relays.publisher import BatchPublisher
from relays.record import SELECT_LIST, record_from_row
from relays.replication import ReplicationConnection, lsn_to_int

log = structlog.get_logger(__name__)


class PublicationMissing(RuntimeError):
    """The publication does not publish the outbox's inserts and the relay's role may not
    create or repair it: the relay waits, not ready, until the owner's `outbox migrate`."""


@dataclass(frozen=True)
class SlotRecord:
    """The relay's row in `relay_slot`."""

    consistent_lsn: int
    backfilled_at: datetime | None
    acked_lsn: int
    acked_commit_at: datetime | None
    acked_seq: int
    publication_fingerprint: str


@dataclass(frozen=True)
class SlotState:
    """The slot as PostgreSQL sees it."""

    confirmed_flush: int | None
    restart_lsn: int | None
    wal_status: str | None
    active_pid: int | None


class SlotKeeper:
    """Owns the slot, the publication and the `relay_slot` record of one outbox schema."""

    def __init__(self, settings: Settings, dsn: str) -> None:
        self._settings = settings
        self._dsn = dsn
        self.schema = settings.db_schema
        self.slot = slot_name(self.schema)
        self.publication = publication_name(self.schema)
        self._table = f'"{self.schema}".{OUTBOX_TABLE}'
        self._db = ReconnectingConnection(dsn)

    @property
    def conn(self) -> psycopg.Connection:
        """The keeper's own connection (reopened after a loss)."""
        return self._db.get()

    def fingerprint(self) -> str | None:
        """Identifies the publication and the outbox's membership in it; it changes when
        either is dropped and made again. None when the publication does not publish the
        outbox's inserts."""
        row = self.conn.execute(
            "select p.oid, p.pubinsert, p.puballtables, pr.oid from pg_publication p"
            " left join pg_publication_rel pr on pr.prpubid = p.oid"
            " and pr.prrelid = to_regclass(%s) where p.pubname = %s",
            (self._table, self.publication)).fetchone()
        if row is None or not row[1] or (row[3] is None and not row[2]):
            return None
        table_oid = self.conn.execute("select to_regclass(%s)::oid", (self._table,)).fetchone()
        return f"{row[0]}:{row[3] or 'all'}:{table_oid[0] if table_oid else '-'}"

    def ensure_publication(self) -> str:
        """The publication's fingerprint, once it publishes the outbox's inserts. The
        migration made it; when it was dropped or changed since, a relay whose role owns the
        outbox repairs it, and any other raises PublicationMissing (the owner's `outbox
        migrate` repairs it)."""
        fingerprint = self.fingerprint()
        if fingerprint is not None:
            return fingerprint
        existed = self.conn.execute("select 1 from pg_publication where pubname = %s",
                                    (self.publication,)).fetchone() is not None
        try:
            self.conn.execute(ensure_publication_sql(self.schema))
        except psycopg.errors.InsufficientPrivilege as exc:
            role = self.conn.info.user
            raise PublicationMissing(
                f"the publication {self.publication} "
                f"{'no longer publishes' if existed else 'is missing, so nothing publishes'}"
                f" the inserts into {self._table}, and the relay's role {role} may not "
                f"{'alter' if existed else 'create'} it ({exc.diag.message_primary}): run "
                "`outbox migrate` as the schema's owner (the relay then resumes)") from exc
        if existed:
            log.warning("publication_repaired", publication=self.publication)
        else:
            log.info("publication_created", publication=self.publication)
        fingerprint = self.fingerprint()
        assert fingerprint is not None
        return fingerprint

    def record(self) -> SlotRecord | None:
        """The relay's record of its slot, if any."""
        with self.conn.cursor(row_factory=dict_row) as cur:
            row = cur.execute(
                "select consistent_lsn, backfilled_at, acked_lsn, acked_commit_at, acked_seq,"
                " publication_fingerprint from relay_slot where slot_name = %s",
                (self.slot,)).fetchone()
        return None if row is None else SlotRecord(**row)

    def state(self) -> SlotState | None:
        """The slot in pg_replication_slots, if it exists."""
        row = self.conn.execute(
            "select confirmed_flush_lsn::text, restart_lsn::text, wal_status, active_pid"
            " from pg_replication_slots where slot_name = %s", (self.slot,)).fetchone()
        if row is None:
            return None
        return SlotState(None if row[0] is None else lsn_to_int(row[0]),
                         None if row[1] is None else lsn_to_int(row[1]), row[2], row[3])

    def why_recreate(self, fingerprint: str) -> str | None:
        """Why the slot cannot be streamed as it is (None: it can)."""
        record, state = self.record(), self.state()
        if state is None:
            return "missing"
        if state.wal_status == "lost":
            return "invalidated"
        if record is None:
            return "foreign: no record of it"
        if record.backfilled_at is None:
            return "unfinished: its backfill did not complete"
        if state.confirmed_flush is not None and state.confirmed_flush > record.acked_lsn:
            return "foreign: confirmed past what this relay acknowledged"
        if record.publication_fingerprint != fingerprint:
            return "publication_changed: the publication changed since the slot was made"
        return None

    def recreate(self, reason: str, fingerprint: str, publisher: BatchPublisher,
                 settle: Callable[[], None]) -> tuple[ReplicationConnection, int]:
        """Drop the slot, make it again with an exported snapshot, and publish the rows the
        stream will not carry (`settle` makes each chunk durable in Kafka). Returns the
        replication connection (ready to stream) and the position to stream from."""
        record = self.record()
        since = None if record is None else (record.acked_commit_at or record.backfilled_at)
        state = self.state()
        first = record is None and state is None  # a new installation, not a repair
        if not first:
            SLOT_RECREATIONS.labels(reason.split(":")[0]).inc()
        (log.info if first else log.warning)(
            "slot_creating" if first else "slot_recreating", slot=self.slot, reason=reason,
            backfill_since=since.isoformat() if since else "the beginning")
        if state is not None:
            self.conn.execute("select pg_drop_replication_slot(%s)", (self.slot,))
        self.conn.execute("delete from relay_slot where slot_name = %s", (self.slot,))
        stream = ReplicationConnection(self._dsn)
        try:
            created = stream.create_slot(self.slot, export_snapshot=True)
            self.conn.execute(
                "insert into relay_slot (slot_name, consistent_lsn, acked_lsn,"
                " acked_commit_at, publication_fingerprint) values (%s, %s, %s, %s, %s)",
                (self.slot, created.consistent_point, created.consistent_point, since,
                 fingerprint))
            count = self._backfill(created.snapshot, since, publisher, settle)
        except BaseException:
            stream.close()
            raise
        self.conn.execute("update relay_slot set backfilled_at = now(), updated_at = now()"
                          " where slot_name = %s", (self.slot,))
        log.info("slot_created", slot=self.slot, reason=reason, backfilled=count,
                 consistent_lsn=created.consistent_point)
        return stream, created.consistent_point

    def _backfill(self, snapshot: str | None, since: datetime | None,
                  publisher: BatchPublisher, settle: Callable[[], None]) -> int:
        """Publish the unpublished rows of the slot's snapshot (created since `since` minus
        the margin, when the relay published before), oldest first."""
        lower = (None if since is None
                 else since - timedelta(seconds=self._settings.relay_backfill_margin_s))
        total = 0
        with psycopg.connect(self._dsn, row_factory=dict_row) as conn:
            conn.execute("begin isolation level repeatable read read only")
            conn.execute(f"set transaction snapshot '{snapshot}'")
            with conn.cursor(name="outbox_backfill") as cur:
                cur.itersize = self._settings.relay_batch_size
                cur.execute(f"select {SELECT_LIST} from outbox where published_at is null"
                            " and (%s::timestamptz is null or created_at >= %s) order by seq",
                            (lower, lower))
                while rows := cur.fetchmany(self._settings.relay_batch_size):
                    for row in rows:
                        publisher.send(record_from_row(row))
                    settle()
                    total += len(rows)
            conn.execute("commit")
        return total

    def save_ack(self, lsn: int, commit_at: float | None, seq: int) -> None:
        """Record what Kafka acknowledged, before the slot is told (see the module doc)."""
        self.conn.execute(
            "update relay_slot set acked_lsn = greatest(acked_lsn, %s),"
            " acked_commit_at = coalesce(to_timestamp(%s), acked_commit_at),"
            " acked_seq = greatest(acked_seq, %s), updated_at = now() where slot_name = %s",
            (lsn, commit_at, seq, self.slot))

    def close(self) -> None:
        """Close the keeper's connection."""
        self._db.close()
