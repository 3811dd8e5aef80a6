"""The polling relay, for databases without logical replication rights.

It never tracks a "last id seen" (ids commit out of order): it locks the oldest unpublished
rows, publishes them, and marks them published in the same transaction. A row whose
transaction commits late is simply still unpublished on a later poll. It wakes on the
outbox trigger's NOTIFY, or after `relay_poll_interval_s`.
"""

from __future__ import annotations

import time

import psycopg
import structlog
from psycopg.rows import dict_row

from outbox.db import ReconnectingConnection
from outbox.pg_names import notify_channel
from outbox.settings import Settings
from relays.publisher import BatchPublisher
from relays.record import SELECT_LIST, record_from_row

log = structlog.get_logger(__name__)

# Marking and reading in one statement; the transaction commits only after every message is
# acknowledged, and rolls back (unmarking the rows) otherwise.
CLAIM_BATCH = (
    "update outbox set published_at = now() where seq in (select seq from outbox where "
    f"published_at is null order by seq limit %s for update) returning {SELECT_LIST}"
)


class PollRelay:
    """Publishes unpublished outbox rows in insertion order."""

    mode = "poll"

    def __init__(self, settings: Settings, dsn: str, publisher: BatchPublisher) -> None:
        self._settings = settings
        self._publisher = publisher
        self._db = ReconnectingConnection(dsn)
        self._listen = ReconnectingConnection(dsn)
        self._channel = notify_channel(settings.db_schema)

    @property
    def conn(self) -> psycopg.Connection:
        """The relay's database connection (reopened after a loss)."""
        return self._db.get()

    def setup(self) -> None:
        """Nothing to create: the outbox table is the queue. (Re)connects."""
        self.close()
        self.conn.execute("select 1 from outbox limit 0")

    def run_once(self) -> int:
        """Publish one batch; when there is nothing to do, wait for a NOTIFY (or the poll
        interval) and return 0."""
        conn = self.conn
        with conn.transaction(), conn.cursor(row_factory=dict_row) as cur:
            rows = cur.execute(CLAIM_BATCH, (self._settings.relay_batch_size,)).fetchall()
            if rows:
                rows.sort(key=lambda r: r["seq"])  # RETURNING does not keep the subquery's order
                records = [record_from_row(r) for r in rows]
                self._publisher.publish(records)
                now = time.time()
                for rec in records:  # insert (the commit is not known here) to ack
                    self._publisher.observe_latency(max(0.0, now - (rec.commit_time or now)))
                return len(records)
        self._wait(self._settings.relay_poll_interval_s)
        return 0

    def _wait(self, timeout: float) -> None:
        fresh = not self._listen.is_open
        listen = self._listen.get()
        if fresh:
            listen.execute(f'listen "{self._channel}"')
        for _ in listen.notifies(timeout=timeout, stop_after=1):
            pass

    def close(self) -> None:
        """Close the database connections."""
        self._db.close()
        self._listen.close()
