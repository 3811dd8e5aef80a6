"""The polling relay, for databases without logical replication rights.

It never tracks a "last id seen" (ids commit out of order): it locks the oldest unpublished
rows, publishes them, and marks them published in the same transaction. A row whose
transaction commits late is simply still unpublished on a later poll.
"""

from __future__ import annotations

import time

import psycopg
import structlog
from psycopg.rows import dict_row

from outbox.db import ReconnectingConnection
from outbox.settings import Settings
from relays.metrics import OLDEST_UNPUBLISHED_AGE
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

    @property
    def conn(self) -> psycopg.Connection:
        """The relay's database connection (reopened after a loss)."""
        return self._db.get()

    def setup(self) -> None:
        """Nothing to create: the outbox table is the queue."""
        self.conn.execute("select 1 from outbox limit 0")

    def run_once(self) -> int:
        """Publish one batch; 0 when there was nothing to do."""
        conn = self.conn
        with conn.transaction():
            with conn.cursor(row_factory=dict_row) as cur:
                rows = cur.execute(CLAIM_BATCH, (self._settings.relay_batch_size,)).fetchall()
            if not rows:
                OLDEST_UNPUBLISHED_AGE.set(0.0)
                return 0
            rows.sort(key=lambda r: r["seq"])  # RETURNING does not keep the subquery's order
            OLDEST_UNPUBLISHED_AGE.set(max(0.0, time.time() - rows[0]["created_at"].timestamp()))
            return self._publisher.publish(record_from_row(r) for r in rows)

    def close(self) -> None:
        """Close the database connection."""
        self._db.close()
