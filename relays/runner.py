"""Running a relay as a process: election, wake-ups, retries, janitor, graceful stop."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Protocol

import psycopg
import structlog
from confluent_kafka import KafkaException

from outbox.db import ReconnectingConnection, libpq_dsn
from outbox.observability import serve_until_stopped
from outbox.pg_names import notify_channel, relay_lock_name
from outbox.settings import Settings
from relays.election import LeaderLock
from relays.janitor import purge_outbox
from relays.logical import LogicalRelay
from relays.metrics import (
    BATCHES,
    DEAD_LETTERS,
    EVENTS_PUBLISHED,
    IS_LEADER,
    PUBLISH_ERRORS,
    PUBLISH_LATENCY,
)
from relays.poll import PollRelay
from relays.publisher import BatchPublisher, PublishError

log = structlog.get_logger(__name__)

MODES = ("logical", "poll")
# A batch waiting longer than this for acknowledgements means the broker is not taking
# writes (a healthy broker acknowledges a full batch within a few seconds).
ACK_STALL_S = 15.0


class Relay(Protocol):
    """A relay mode: `setup` once per leadership, then `run_once` per batch."""

    mode: str

    def setup(self) -> None: ...
    def run_once(self) -> int: ...
    def close(self) -> None: ...


class Waker:
    """Blocks until the outbox trigger's NOTIFY arrives, or the fallback interval passes."""

    def __init__(self, dsn: str, schema: str) -> None:
        self._db = ReconnectingConnection(dsn)
        self._channel = notify_channel(schema)

    def wait(self, timeout: float) -> None:
        """Return on a notification or after `timeout` seconds."""
        try:
            fresh = not self._db.is_open
            conn = self._db.get()
            if fresh:
                conn.execute(f'listen "{self._channel}"')
            for _ in conn.notifies(timeout=timeout, stop_after=1):
                pass
        except psycopg.Error as exc:
            log.warning("listen_failed", error=str(exc))
            self._db.close()
            time.sleep(timeout)

    def close(self) -> None:
        """Close the LISTEN connection."""
        self._db.close()


class RelayProcess:
    """One relay: waits as a standby until it holds the lock, then publishes until stopped."""

    def __init__(
        self,
        settings: Settings,
        mode: str,
        stop: threading.Event | None = None,
        observe_latency: Callable[[float], None] = PUBLISH_LATENCY.observe,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}")
        self.settings = settings
        self.mode = mode
        self.stop = stop or threading.Event()
        self.dsn = libpq_dsn(settings)
        self.leader = False
        self.last_batch_at: float | None = None
        self.failing_since: float | None = None  # first of the current run of errors
        self.last_error: str | None = None
        self._publisher: BatchPublisher | None = None
        self._observe_latency = observe_latency

    def health(self) -> dict[str, object]:
        """Healthy as leader or standby (the report says which); `failing` (HTTP 503) while
        every attempt to publish fails or a batch waits for acknowledgements that do not
        come, e.g. during a broker outage."""
        publisher = self._publisher
        stalled = publisher is not None and publisher.seconds_awaiting_acks() > ACK_STALL_S
        failing = self.failing_since is not None or stalled
        return {"status": "failing" if failing else "ok",
                "mode": self.mode, "role": "leader" if self.leader else "standby",
                "last_batch_at": self.last_batch_at, "failing_since": self.failing_since,
                "last_error": self.last_error}

    def _make_relay(self, publisher: BatchPublisher) -> Relay:
        cls = LogicalRelay if self.mode == "logical" else PollRelay
        return cls(self.settings, self.dsn, publisher)

    def run(self) -> int:
        """Run until `stop` is set; return the process exit code.

        Leadership can be lost (the lock's session ended, e.g. a database restart): the
        relay then stops publishing and waits as a standby again.
        """
        lock = LeaderLock(self.dsn, relay_lock_name(self.settings.db_schema))
        while lock.acquire(self.stop.is_set, self.settings.relay_lock_poll_s):
            self.leader = True
            IS_LEADER.set(1)
            publisher = BatchPublisher(
                self.settings, stop_requested=self.stop.is_set,
                observe_latency=self._observe_latency,
                on_dead_letter=DEAD_LETTERS.labels(self.mode).inc)
            self._publisher = publisher
            relay = self._make_relay(publisher)
            waker = Waker(self.dsn, self.settings.db_schema)
            try:
                self._lead(relay, waker, lock)
            finally:
                relay.close()
                waker.close()
                publisher.close()
                self._publisher = None
                lock.release()
                self.leader = False
                IS_LEADER.set(0)
        log.info("relay_stopped", mode=self.mode)
        return 0

    def _lead(self, relay: Relay, waker: Waker, lock: LeaderLock) -> None:
        """Publish until stopped or until the lock is lost."""
        backoff = 0.0
        ready = False
        next_janitor = time.monotonic() + self.settings.janitor_interval_s
        while not self.stop.is_set():
            # Checked before every batch, so a relay that lost its lock publishes at most
            # the batch in hand next to the new leader.
            if not lock.still_held():
                log.error("leader_lock_lost")
                return
            try:
                if not ready:
                    relay.setup()
                    ready = True
                    log.info("relay_started", mode=self.mode, schema=self.settings.db_schema)
                count = relay.run_once()
                backoff = 0.0
                self.failing_since = self.last_error = None
                if count:
                    self.last_batch_at = time.time()
                    EVENTS_PUBLISHED.labels(self.mode).inc(count)
                    BATCHES.labels(self.mode).inc()
                    continue
                if time.monotonic() > next_janitor:
                    self._janitor()
                    next_janitor = time.monotonic() + self.settings.janitor_interval_s
                waker.wait(self.settings.relay_poll_interval_s)
            except (PublishError, KafkaException, psycopg.Error, OSError) as exc:
                PUBLISH_ERRORS.labels(self.mode).inc()
                self.failing_since = self.failing_since or time.time()
                self.last_error = str(exc)[:300]
                if isinstance(exc, psycopg.Error):
                    ready = False
                backoff = min(max(backoff * 2, 0.5), 10.0)
                log.warning("relay_retry", error=str(exc)[:300], backoff_s=backoff)
                self.stop.wait(backoff)

    def _janitor(self) -> None:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            deleted = purge_outbox(conn, self.mode, self.settings.outbox_retention_s)
        if deleted:
            log.info("outbox_purged", rows=deleted)


def serve_relay(settings: Settings, mode: str, host: str, port: int) -> int:
    """The `outbox relay` process: metrics and health on host:port, SIGTERM stops it."""
    process = RelayProcess(settings, mode)
    return serve_until_stopped(process.stop, process.health, host, port, process.run)
