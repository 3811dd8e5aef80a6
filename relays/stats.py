"""Sampling the relay's position from the database, apart from the publish loop, so the
gauges stay true while publishing fails (a stuck relay must look stuck)."""

from __future__ import annotations

import math
import threading

import psycopg
import structlog

from outbox.db import ReconnectingConnection
from outbox.pg_names import slot_name
from relays.metrics import OLDEST_UNPUBLISHED_AGE, SLOT_LAG_BYTES, SLOT_RETAINED_WAL_BYTES

log = structlog.get_logger(__name__)

# Logical mode: rows after the highest acknowledged seq (an estimate: a row that committed
# late with a lower seq is not seen). Poll mode: the oldest row not marked published.
OLDEST = {
    "logical": "select extract(epoch from now() - created_at) from outbox where seq > "
               "coalesce((select acked_seq from relay_slot where slot_name = %(slot)s), 0) "
               "order by seq limit 1",
    "poll": "select extract(epoch from now() - created_at) from outbox "
            "where published_at is null order by seq limit 1",
}
SLOT = ("select pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::bigint,"
        " pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::bigint"
        " from pg_replication_slots where slot_name = %(slot)s")


class StatsSampler:
    """Refreshes the position gauges every `interval_s` on a thread of its own."""

    def __init__(self, dsn: str, schema: str, mode: str, interval_s: float = 2.0) -> None:
        self._db = ReconnectingConnection(dsn)
        self._params = {"slot": slot_name(schema)}
        self._mode = mode
        self._interval = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="relay-stats")

    def start(self) -> None:
        """Sample in the background until `stop`."""
        self._thread.start()

    def sample(self) -> None:
        """Set the gauges once; NaN where the database cannot say."""
        try:
            conn = self._db.get()
            oldest = conn.execute(OLDEST[self._mode], self._params).fetchone()
            OLDEST_UNPUBLISHED_AGE.set(max(0.0, float(oldest[0])) if oldest else 0.0)
            slot = conn.execute(SLOT, self._params).fetchone()
            retained, lag = slot if slot else (0, 0)
            SLOT_RETAINED_WAL_BYTES.set(math.nan if retained is None else retained)
            SLOT_LAG_BYTES.set(math.nan if lag is None else lag)
        except psycopg.Error as exc:
            self._db.close()
            for gauge in (OLDEST_UNPUBLISHED_AGE, SLOT_RETAINED_WAL_BYTES, SLOT_LAG_BYTES):
                gauge.set(math.nan)
            log.warning("stats_unavailable", error=str(exc)[:200])

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self._interval)
        self._db.close()

    def stop(self) -> None:
        """Stop sampling."""
        self._stop.set()
        self._thread.join(5)
