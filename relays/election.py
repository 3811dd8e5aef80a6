"""One active relay per outbox: a PostgreSQL advisory lock elects it, a standby waits.

The lock lives on its own connection; when the leader dies its session ends and the lock is
released, so a standby polling `pg_try_advisory_lock` takes over within one poll interval.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import psycopg
import structlog

from outbox.db import ReconnectingConnection

log = structlog.get_logger(__name__)


class LeaderLock:
    """An advisory lock named after the outbox it guards."""

    def __init__(self, dsn: str, name: str) -> None:
        self._db = ReconnectingConnection(dsn)
        self._name = name

    def acquire(self, should_stop: Callable[[], bool], poll_s: float = 1.0,
                attempts: int | None = None) -> bool:
        """Block until this process leads (True), or a stop is requested or `attempts` tries
        failed (False)."""
        waiting_logged = False
        tries = 0
        while not should_stop() and (attempts is None or tries < attempts):
            tries += 1
            try:
                got = self._db.get().execute(
                    "select pg_try_advisory_lock(hashtextextended(%s, 0))", (self._name,)
                ).fetchone()
                if got and got[0]:
                    log.info("leader_elected", lock=self._name)
                    return True
            except psycopg.OperationalError as exc:
                log.warning("leader_lock_unavailable", error=str(exc))
                self._db.close()
            if not waiting_logged:
                log.info("standby_waiting", lock=self._name)
                waiting_logged = True
            if attempts is None or tries < attempts:
                time.sleep(poll_s)
        return False

    def still_held(self) -> bool:
        """False when the lock connection was lost (then another relay may lead)."""
        if not self._db.is_open:
            return False
        try:
            self._db.get().execute("select 1")
            return True
        except psycopg.Error:
            return False

    def release(self) -> None:
        """Give the lock up by closing its session."""
        self._db.close()
