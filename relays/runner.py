"""Running a relay as a process: election, retries, health, janitor, graceful stop.

Failures and what the relay does about them:
- Kafka or PostgreSQL unreachable, a batch not acknowledged: retried with backoff, the
  stream restarted from the last confirmed position (duplicates, never loss).
- A fatal producer (fenced): the producer is replaced and publishing resumes from the last
  acknowledged position.
- The publication changed under the slot: the slot is recreated with a backfill.
- The publication is missing or no longer covers the outbox, and the relay's role may not
  repair it: `publication_missing` on /healthz (not ready on /readyz), the log naming the
  command that fixes it (`outbox migrate` as the owner); checked every `PUBLICATION_RETRY_S`.
- A schema change the relay cannot decode: it stops publishing, reports `schema_mismatch`
  on /healthz (and not ready on /readyz), logs the reason, and tries again every
  `SCHEMA_RETRY_S` (the process stays up: no crash loop, the slot keeps its position).

Liveness (/healthz) fails only when neither the main loop nor the producer moved for
`STALL_S` (a call that never returns); readiness (/readyz) says whether PostgreSQL and the
broker answer and, for the leader, whether its slot (poll: the outbox) is being published.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Protocol

import psycopg
import structlog
from confluent_kafka import KafkaException

from outbox.db import libpq_dsn
from outbox.emit_mode import stored_emit_mode
from outbox.observability import serve_until_stopped
from outbox.pg_names import relay_lock_name, slot_name
from outbox.readiness import (
    CachedProbes,
    Check,
    failure_code,
    kafka_probe,
    missing,
    ok,
    postgres_probe,
    readiness_report,
)
from outbox.settings import Settings
from relays.checkpointer import transactional_id
from relays.election import LeaderLock
from relays.janitor import purge_outbox, purge_processed_events
from relays.logical import LogicalRelay, PublicationChanged, SchemaMismatch
from relays.metrics import (
    BATCHES,
    DEAD_LETTERS,
    EVENTS_PUBLISHED,
    IS_LEADER,
    PUBLISH_ERRORS,
    PUBLISH_LATENCY,
    start_counting,
)
from relays.pgoutput import TruncatedFrame
from relays.poll import PollRelay
from relays.publisher import BatchPublisher, ProducerFatal, PublishError
from relays.replication import ReplicationError
from relays.slot import PublicationMissing
from relays.stats import StatsSampler

log = structlog.get_logger(__name__)

MODES = ("logical", "poll")
# A batch waiting longer than this for acknowledgements means the broker is not taking
# writes (a healthy broker acknowledges a full batch within a few seconds).
ACK_STALL_S = 15.0
SCHEMA_RETRY_S = 30.0
# The owner's `outbox migrate` repairs a missing publication in a second: look again soon.
PUBLICATION_RETRY_S = 2.0
# The main loop turns at least every SCHEMA_RETRY_S, and a producer moves every thousand
# messages or waits for acknowledgements (an outage, not a stall): ten minutes without
# either is a call that will not return.
STALL_S = 600.0
# A truncated frame is a stream cut short: read again from the position.
RETRIABLE = (PublishError, KafkaException, psycopg.Error, ReplicationError, OSError,
             TruncatedFrame)


class Relay(Protocol):
    """A relay mode: `setup` once per leadership (and after a failure), then `run_once`
    per batch (it waits for work itself when there is none)."""

    mode: str

    def setup(self) -> None: ...
    def run_once(self) -> int: ...
    def close(self) -> None: ...


class RelayProcess:
    """One relay: waits as a standby until it holds the lock, then publishes until stopped."""

    def __init__(
        self,
        settings: Settings,
        mode: str,
        stop: threading.Event | None = None,
        observe_latency: Callable[[float], None] = PUBLISH_LATENCY.observe,
        publisher_factory: Callable[..., BatchPublisher] = BatchPublisher,
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
        self.last_error: str | None = None  # logged; /healthz shows `last_error_code` only
        self.last_error_code: str | None = None
        self.problem: str | None = None  # needs a person: schema_mismatch, publication_missing
        self.producers_replaced = 0
        self.publishing = False  # the leader's slot (poll: outbox) is set up and read
        self._loop_at = time.monotonic()
        self._probes = CachedProbes({"database": postgres_probe(self.dsn),
                                     "broker": kafka_probe(settings)})
        self._publisher: BatchPublisher | None = None
        self._observe_latency = observe_latency
        self._publisher_factory = publisher_factory

    def health(self) -> dict[str, object]:
        """Healthy as leader or standby (the report says which); `failing` while every
        attempt to publish fails or a batch waits for acknowledgements that do not come (a
        broker outage); `schema_mismatch` while the outbox cannot be decoded. Either way the
        process is alive (`/healthz` 200); `/readyz` says it is not ready."""
        failing = self.failing_since is not None or self._ack_wait_s() > ACK_STALL_S
        status = self.problem or ("failing" if failing else "ok")
        return {"status": status, "mode": self.mode,
                "role": "leader" if self.leader else "standby",
                "last_batch_at": self.last_batch_at, "failing_since": self.failing_since,
                "last_error_code": self.last_error_code}

    def readiness(self) -> dict[str, object]:
        """Report for `/readyz`: ready when PostgreSQL and the broker answer and, for the
        leader, its slot (poll: the outbox) is being published without failing. A standby
        is ready too (`role` says which): it takes over when the leader goes."""
        checks = self._probes.results()
        if self.leader:
            checks["slot" if self.mode == "logical" else "outbox"] = self._publishing_check()
        return readiness_report(checks, mode=self.mode,
                                role="leader" if self.leader else "standby")

    def _ack_wait_s(self) -> float:
        """How long the batch in hand has waited for the broker's acknowledgements."""
        publisher = self._publisher
        return publisher.seconds_awaiting_acks() if publisher is not None else 0.0

    def _publishing_check(self) -> Check:
        if self.problem is not None:
            return missing(self.problem, f"{self.problem}: {self.last_error}")
        if (waited := self._ack_wait_s()) > ACK_STALL_S:
            return missing("acks_stalled", f"acknowledgements awaited for {waited:.0f}s")
        if self.failing_since is not None:
            return missing("failing",
                           f"failing since {self.failing_since:.0f}: {self.last_error}")
        if not self.publishing:
            return missing("starting", "being set up")
        return ok()

    def stalled(self) -> str | None:
        """Why liveness fails: neither the main loop nor the producer moved for `STALL_S`
        (a producer waiting for acknowledgements during an outage moves). None while alive."""
        publisher = self._publisher
        last = max(self._loop_at, publisher.progress_at if publisher is not None else 0.0)
        idle = time.monotonic() - last
        return f"no progress for {idle:.0f}s" if idle > STALL_S else None

    def _turn(self) -> bool:
        """One turn of the main loop (liveness); whether a stop was requested."""
        self._loop_at = time.monotonic()
        return self.stop.is_set()

    def _make_relay(self, publisher: BatchPublisher) -> Relay:
        cls = LogicalRelay if self.mode == "logical" else PollRelay
        return cls(self.settings, self.dsn, publisher)

    def run(self) -> int:
        """Run until `stop` is set; return the process exit code.

        Leadership can be lost (the lock's session ended, e.g. a database restart): the
        relay then stops publishing and waits as a standby again.
        """
        start_counting(self.mode)
        lock = LeaderLock(self.dsn, relay_lock_name(self.settings.db_schema))
        stats = StatsSampler(self.dsn, self.settings.db_schema, self.mode)
        stats.start()
        try:
            while lock.acquire(self._turn, self.settings.relay_lock_poll_s):
                self.leader = True
                IS_LEADER.set(1)
                try:
                    while self._lead_with_a_producer(lock):
                        self.producers_replaced += 1
                finally:
                    lock.release()
                    self.leader = False
                    IS_LEADER.set(0)
        finally:
            stats.stop()
        log.info("relay_stopped", mode=self.mode)
        return 0

    def _lead_with_a_producer(self, lock: LeaderLock) -> bool:
        """Lead with one producer; True when it turned fatal and must be replaced."""
        publisher = self._publisher_factory(
            self.settings, stop_requested=self.stop.is_set,
            observe_latency=self._observe_latency,
            on_dead_letter=DEAD_LETTERS.labels(self.mode).inc,
            transactional_id=transactional_id(self.settings, self.dsn)
            if self.mode == "logical" else None)
        self._publisher = publisher
        relay = self._make_relay(publisher)
        try:
            self._lead(relay, lock)
            return False
        except ProducerFatal as exc:
            self._fail(exc)
            log.error("producer_replaced", error=str(exc)[:300])
            return not self.stop.is_set()
        finally:
            self.publishing = False
            relay.close()
            publisher.close()
            self._publisher = None

    def _lead(self, relay: Relay, lock: LeaderLock) -> None:
        """Publish until stopped or until the lock is lost."""
        backoff = 0.0
        next_janitor = time.monotonic() + self.settings.janitor_interval_s
        while not self._turn():
            # Checked before every batch, so a relay that lost its lock publishes at most
            # the batch in hand next to the new leader.
            if not lock.still_held():
                log.error("leader_lock_lost")
                return
            try:
                if not self.publishing:
                    relay.setup()
                    self.publishing = True
                    self.problem = None
                    log.info("relay_started", mode=self.mode, schema=self.settings.db_schema)
                count = relay.run_once()
                backoff = 0.0
                self.failing_since = self.last_error = self.last_error_code = None
                if count:
                    self.last_batch_at = time.time()
                    EVENTS_PUBLISHED.labels(self.mode).inc(count)
                    BATCHES.labels(self.mode).inc()
                elif time.monotonic() > next_janitor:
                    self._janitor()
                    next_janitor = time.monotonic() + self.settings.janitor_interval_s
            except ProducerFatal:
                raise
            except SchemaMismatch as exc:
                self.publishing = False
                self._fail(exc)
                self.problem = "schema_mismatch"
                log.error("relay_schema_mismatch", error=str(exc),
                          action=f"publishing stopped; retrying in {SCHEMA_RETRY_S:.0f}s")
                self.stop.wait(SCHEMA_RETRY_S)
            except PublicationMissing as exc:
                self.publishing = False
                self._fail(exc)
                if self.problem != "publication_missing":  # said once, not every retry
                    log.error("relay_publication_missing", error=str(exc),
                              action="waiting for the owner's `outbox migrate`")
                self.problem = "publication_missing"
                self.stop.wait(PUBLICATION_RETRY_S)
            except PublicationChanged as exc:
                self.publishing = False
                self._fail(exc)
                log.error("publication_changed", error=str(exc), action="recreating the slot")
            except RETRIABLE as exc:
                self.publishing = False
                self._fail(exc)
                backoff = min(max(backoff * 2, 0.5), 10.0)
                log.warning("relay_retry", error=str(exc)[:300], backoff_s=backoff)
                self.stop.wait(backoff)

    def _fail(self, exc: Exception) -> None:
        PUBLISH_ERRORS.labels(self.mode).inc()
        self.failing_since = self.failing_since or time.time()
        self.last_error = str(exc)[:300]
        self.last_error_code = failure_code(exc)

    def _janitor(self) -> None:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            # Message mode writes no outbox row: nothing to purge, and no scan for it.
            deleted = 0 if stored_emit_mode(conn) == "message" else purge_outbox(
                conn, self.mode, self.settings.outbox_retention_s,
                slot=slot_name(self.settings.db_schema),
                margin_s=self.settings.relay_backfill_margin_s)
            tracked = purge_processed_events(conn, self.settings.processed_event_retention_s)
        if deleted or tracked:
            log.info("outbox_purged", rows=deleted, tracking_records=tracked)


def serve_relay(settings: Settings, mode: str, host: str, port: int) -> int:
    """The `outbox relay` process: metrics and health on host:port, SIGTERM stops it."""
    process = RelayProcess(settings, mode)
    return serve_until_stopped(process.stop, process.health, host, port, process.run,
                               ready=process.readiness, stalled=process.stalled)
