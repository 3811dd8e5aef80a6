"""A write load that rides through faults, and reading back what it committed."""

from __future__ import annotations

import random
import threading
import time

from sqlalchemy import text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError

from outbox import emit


class CounterLoad:
    """Writers that bump counters (`agg` table of tests.relay_harness.create_counter_table)
    and emit one event per bump, 1..3 per transaction, until `events` were attempted or
    `stop()`. A database error (a restart) is retried after a pause. What was committed is
    read back from the outbox (`committed_ids`): a commit cut by a restart may or may not
    have happened, so the writer cannot know."""

    def __init__(self, engine: Engine, *, aggregates: int, threads: int = 4,
                 events: int | None = None, rate: float | None = None) -> None:
        self._engine = engine
        self._aggregates = aggregates
        self._budget = events
        self._pause = threads / rate if rate else 0.0  # per writer, between transactions
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.errors = 0
        self._threads = [threading.Thread(target=self._work, args=(i,), daemon=True)
                         for i in range(threads)]

    def start(self) -> CounterLoad:
        for t in self._threads:
            t.start()
        return self

    def running(self) -> bool:
        return any(t.is_alive() for t in self._threads)

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(60)

    def _take(self, n: int) -> int:
        with self._lock:
            if self._budget is None:
                return n
            n = min(n, self._budget)
            self._budget -= n
            return n

    def _work(self, wid: int) -> None:
        rnd = random.Random(wid)
        while not self._stop.is_set():
            n = self._take(rnd.randint(1, 3))
            if n == 0:
                return
            # Locks in id order: concurrent transactions cannot deadlock.
            aggs = sorted(rnd.randrange(self._aggregates) for _ in range(n))
            while not self._stop.is_set():
                try:
                    self._transaction(aggs)
                    break
                except DBAPIError:
                    with self._lock:
                        self.errors += 1
                    time.sleep(0.2)
            if self._pause:
                self._stop.wait(self._pause)

    def _transaction(self, aggs: list[int]) -> None:
        with self._engine.begin() as conn:
            for agg in aggs:
                version = conn.execute(text(
                    "update agg set version = version + 1 where id = :id returning version"),
                    {"id": agg}).scalar_one()
                emit(conn, aggregate_type="counter", aggregate_id=str(agg),
                     type="counter.bumped", aggregate_version=version, org_id="o",
                     payload={"agg": agg, "version": version})


def committed_ids(engine: Engine) -> set[str]:
    """The ids of every event committed in the outbox of the engine's schema."""
    with engine.connect() as conn:
        return set(conn.execute(text("select id::text from outbox")).scalars())
