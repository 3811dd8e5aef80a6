"""`outbox_projector_lag_seconds` is current at every scrape (it neither freezes between
batches nor while a batch waits for its store), and a projector's counters exist at 0 from
its start. No server: a runtime is built against addresses where nothing listens."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from prometheus_client import REGISTRY

from outbox.envelope import EventEnvelope
from projectors.lag import LagClock
from projectors.runtime import ConsumerRuntime
from projectors.settings import RuntimeSettings

T0 = 1_800_000_000.0


class Clock:
    """A clock the test moves."""

    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


def at(seconds: float) -> datetime:
    return datetime.fromtimestamp(T0 + seconds, UTC)


@pytest.fixture
def clock() -> Clock:
    return Clock()


def test_a_fresh_projector_is_not_behind(clock):
    assert LagClock(clock).seconds() == 0.0


def test_the_lag_grows_while_a_batch_waits_for_its_store(clock):
    lag = LagClock(clock)
    clock.now = T0 + 10
    lag.batch_received([at(8), at(9)])
    assert lag.seconds() == 2.0
    clock.now = T0 + 310  # retried for five minutes: no apply, the gauge still moves
    assert lag.seconds() == 302.0


def test_caught_up_is_zero_however_old_the_last_event_was(clock):
    lag = LagClock(clock)
    lag.batch_received([at(0)])
    clock.now = T0 + 1
    lag.batch_applied([at(0)])
    lag.nothing_new()
    clock.now = T0 + 3600  # an hour without events is not an hour behind
    assert lag.seconds() == 0.0
    lag.batch_received([at(3599)])  # the next event, a second old
    assert lag.seconds() == 1.0


def test_between_two_batches_of_a_backlog_the_lag_is_the_last_applied_events_age(clock):
    lag = LagClock(clock)
    clock.now = T0 + 100
    lag.batch_received([at(10), at(20)])
    assert lag.seconds() == 90.0
    lag.batch_applied([at(10), at(20)])
    assert lag.seconds() == 80.0  # more to read: not caught up
    clock.now = T0 + 130
    assert lag.seconds() == 110.0
    lag.batch_received([at(21)])
    assert lag.seconds() == 109.0


def test_a_batch_handed_back_keeps_its_age_until_applied(clock):
    lag = LagClock(clock)
    clock.now = T0 + 50
    lag.batch_received([at(40), at(45)])
    lag.nothing_new()  # the seek back has not fetched yet: still behind
    assert lag.seconds() == 10.0
    lag.batch_received([at(45), at(46)])  # read again, with a later event
    assert lag.seconds() == 10.0
    lag.batch_applied([at(45), at(46)])
    lag.nothing_new()
    assert lag.seconds() == 0.0


def test_revoked_partitions_are_the_new_owners_lag(clock):
    lag = LagClock(clock)
    clock.now = T0 + 500
    lag.batch_received([at(0)])
    lag.revoked()
    assert lag.seconds() == 0.0


def test_a_batch_of_undecodable_messages_only_changes_nothing(clock):
    lag = LagClock(clock)
    clock.now = T0 + 5
    lag.batch_received([])
    lag.batch_applied([])
    assert lag.seconds() == 0.0


class Recorder:
    """A projector that applies nothing (the runtime is never run against a broker)."""

    aggregate_types = ("lagtest",)

    def __init__(self, name: str) -> None:
        self.name = name

    def apply(self, events: list[EventEnvelope]) -> None:
        """Apply nothing."""

    def close(self) -> None:
        """Nothing to release."""


@pytest.fixture
def unreachable() -> RuntimeSettings:
    """Settings whose broker and database are addresses where nothing listens."""
    return RuntimeSettings(database_url="postgresql+psycopg://u:p@127.0.0.1:1/none",
                           kafka_bootstrap="127.0.0.1:1")


def _sample(name: str, projector: str) -> float | None:
    return REGISTRY.get_sample_value(name, {"projector": projector})


def _stopped(runtime: ConsumerRuntime) -> None:
    runtime.stop.set()
    runtime.run()  # returns at once, closing the consumer and the producer


def test_a_live_runtime_exports_its_counters_at_zero_and_its_lag_at_every_scrape(unreachable):
    name = "lagtest-live"
    for series in ("outbox_projector_dead_letters_total",
                   "outbox_projector_events_applied_total", "outbox_projector_retries_total",
                   "outbox_projector_lag_seconds"):
        assert _sample(series, name) is None
    runtime = ConsumerRuntime(unreachable, Recorder(name))
    try:
        assert _sample("outbox_projector_dead_letters_total", name) == 0.0
        assert _sample("outbox_projector_events_applied_total", name) == 0.0
        assert _sample("outbox_projector_retries_total", name) == 0.0
        assert _sample("outbox_projector_lag_seconds", name) == 0.0
        runtime.lag.batch_received([datetime(2020, 1, 1, tzinfo=UTC)])
        first = _sample("outbox_projector_lag_seconds", name)
        assert first is not None and first > 86400 * 365
        assert _sample("outbox_projector_lag_seconds", name) >= first  # read at each scrape
    finally:
        _stopped(runtime)


def test_a_rebuilds_replay_does_not_export_the_live_projectors_lag(unreachable):
    name = "lagtest-rebuild"
    runtime = ConsumerRuntime(unreachable, Recorder(name), group_id="outbox.rebuild.copy-1")
    try:
        assert _sample("outbox_projector_dead_letters_total", name) == 0.0
        assert _sample("outbox_projector_lag_seconds", name) is None
    finally:
        _stopped(runtime)
