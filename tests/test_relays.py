"""Relays against the real PostgreSQL and broker: lossless, ordered, leader-elected."""

from __future__ import annotations

import json
import time

import psycopg
import pytest
from kafka import KafkaConsumer
from sqlalchemy import text

from outbox import emit
from outbox.db import libpq_dsn
from outbox.kafka import dlq_topic
from outbox.pg_names import relay_lock_name, slot_name
from tests.pipeline_harness import wait_for
from tests.relay_harness import (
    create_counter_table,
    load_in_background,
    order_violations,
    read_topic,
    stack,
    superuser,
    write_load,
)

MODES = ["logical", "poll"]


def _topic(settings) -> str:
    return f"{settings.topic_prefix}.counter"


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_exactly_the_committed_events_arrive_in_order(mode, relay_settings, engine, relays):
    create_counter_table(engine, aggregates=50)
    relay = relays(mode)
    relay.wait_role("leader")
    load = write_load(engine, events=10_000, aggregates=50, threads=8)
    assert load.rolled_back, "the load must include rolled-back transactions"
    got = read_topic(relay_settings.kafka_bootstrap, _topic(relay_settings), load.committed)
    assert set(got.ids) == load.committed  # nothing lost, nothing rolled back leaked
    assert got.duplicates == 0
    assert got.headers_ok
    with engine.connect() as conn:
        final = dict(conn.execute(text("select id::text, version from agg")).all())
    # Per aggregate: exactly 1..n in order (versions of rolled-back transactions never exist).
    for agg, versions in got.versions.items():
        assert versions == list(range(1, final[agg] + 1)), agg
    assert relay.terminate() == 0
    # Read again once the relay is gone: nothing was sent twice later either.
    again = read_topic(relay_settings.kafka_bootstrap, _topic(relay_settings), load.committed)
    assert again.duplicates == 0 and sum(again.ids.values()) == len(load.committed)


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_sigkill_during_load_loses_nothing(mode, relay_settings, engine, relays):
    create_counter_table(engine, aggregates=20)
    writer, load = load_in_background(engine, events=6000, aggregates=20, threads=4)
    kills = 0
    while writer.is_alive() or kills < 3:
        relay = relays(mode)
        relay.wait_role("leader")
        time.sleep(0.3 + 0.2 * kills)
        relay.kill()
        kills += 1
    writer.join()
    with engine.connect() as conn:
        before_max = dict(conn.execute(text("select id::text, version from agg")).all())
    relays(mode).wait_role("leader")
    after = write_load(engine, events=500, aggregates=20, threads=2, seed=7)
    expect = load.committed | after.committed
    got = read_topic(relay_settings.kafka_bootstrap, _topic(relay_settings), expect)
    assert set(got.ids) == expect, f"lost {len(expect - set(got.ids))}"
    # A killed producer may leave a partial batch (broker caveats, docs/operating/relays.md);
    # the relay re-sends from its last acknowledged position. Once it runs undisturbed, order
    # is exact.
    for agg, versions in got.versions.items():
        fresh = [v for v in versions if v > before_max[agg]]
        assert fresh == list(range(before_max[agg] + 1, before_max[agg] + 1 + len(fresh)))
    anomalies = order_violations(got.versions)
    print(f"{mode}: {kills} kills, {len(expect)} events, {got.duplicates} duplicates, "
          f"{len(anomalies)} partial batches from killed producers")


@pytest.mark.slow
def test_broker_outage_relay_waits_and_catches_up(relay_settings, engine, relays):
    create_counter_table(engine, aggregates=5)
    relay = relays("logical")
    relay.wait_role("leader")
    before = write_load(engine, events=100, aggregates=5, threads=2)
    read_topic(relay_settings.kafka_bootstrap, _topic(relay_settings), before.committed)
    dsn = libpq_dsn(relay_settings)

    def confirmed() -> str:
        with psycopg.connect(dsn) as conn:
            return conn.execute("select confirmed_flush_lsn::text from pg_replication_slots "
                                "where slot_name = %s", (slot_name(relay_settings.db_schema),)
                                ).fetchone()[0]

    stack("stop-broker")
    try:
        during = write_load(engine, events=300, aggregates=5, threads=2, seed=2)
        time.sleep(1.0)
        held = confirmed()
        time.sleep(4.0)  # relay retries meanwhile; heartbeats must not move past the backlog
        assert confirmed() == held
        assert relay.proc.poll() is None
        wait_for(lambda: relay.health()["status"] == "failing", timeout_s=40,
                 what="health reports the outage")
    finally:
        stack("start-broker")
    expect = before.committed | during.committed
    got = read_topic(relay_settings.kafka_bootstrap, _topic(relay_settings), expect, 120)
    assert set(got.ids) == expect
    assert order_violations(got.versions) == []


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_standby_takes_over(mode, relay_settings, engine, relays):
    create_counter_table(engine, aggregates=5)
    first = relays(mode)
    first.wait_role("leader")
    second = relays(mode)
    second.wait_role("standby")
    time.sleep(1.0)
    assert second.health()["role"] == "standby"
    first.kill()
    took = second.wait_role("leader", timeout_s=10)
    assert took < 3 * relay_settings.relay_lock_poll_s + 2
    load = write_load(engine, events=200, aggregates=5, threads=2)
    got = read_topic(relay_settings.kafka_bootstrap, _topic(relay_settings), load.committed)
    assert set(got.ids) == load.committed
    print(f"{mode}: standby took over in {took:.2f}s")


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_leader_that_loses_its_lock_stays_in_the_election(mode, relay_settings, engine, relays,
                                                          tmp_path):
    create_counter_table(engine, aggregates=5)
    first = relays(mode)
    first.wait_role("leader")
    second = relays(mode)
    second.wait_role("standby")
    # End the session that holds the leader's advisory lock, as a database restart would
    # (an administrator's step: the relay's session is not the owner's to end).
    lock_key = relay_lock_name(relay_settings.db_schema)
    with superuser() as conn:
        ended = conn.execute(
            "select count(pg_terminate_backend(pid)) from pg_locks where locktype = 'advisory'"
            " and granted and ((classid::bigint << 32) | objid::bigint)"
            " = hashtextextended(%s, 0)", (lock_key,)).fetchone()[0]
    assert ended == 1
    deadline = time.monotonic() + 10
    while b"leader_lock_lost" not in (tmp_path / "relay-0.log").read_bytes():
        assert time.monotonic() < deadline, "the leader did not notice it lost its lock"
        time.sleep(0.1)
    # Either relay may win the new election; the old leader stays, as leader or standby.
    time.sleep(2 * relay_settings.relay_lock_poll_s)
    roles = {p: p.health()["role"] for p in (first, second)}
    assert sorted(roles.values()) == ["leader", "standby"]
    assert first.proc.poll() is None
    load = write_load(engine, events=200, aggregates=5, threads=2)
    got = read_topic(relay_settings.kafka_bootstrap, _topic(relay_settings), load.committed)
    assert set(got.ids) == load.committed
    leader, standby = sorted(roles, key=lambda p: roles[p] != "leader")
    leader.kill()
    standby.wait_role("leader", timeout_s=10)


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_a_row_too_large_for_the_broker_is_dead_lettered(mode, relay_settings, engine, relays):
    relay = relays(mode)
    relay.wait_role("leader")
    with engine.begin() as conn:
        big = emit(conn, aggregate_type="counter", aggregate_id="big", type="t",
                   payload={"blob": "x" * 1_200_000}, aggregate_version=1)
    with engine.begin() as conn:
        after = emit(conn, aggregate_type="counter", aggregate_id="after", type="t",
                     payload={}, aggregate_version=1)
    topic = _topic(relay_settings)
    assert set(read_topic(relay_settings.kafka_bootstrap, topic, {str(after)}).ids) == \
        {str(after)}
    dlq = KafkaConsumer(dlq_topic(topic, "relay"),
                        bootstrap_servers=relay_settings.kafka_bootstrap,
                        auto_offset_reset="earliest", consumer_timeout_ms=5000)
    got = [(m.key, dict(m.headers), json.loads(m.value)) for m in dlq]
    dlq.close()
    assert [(k, h["id"], v["payload"]) for k, h, v in got] == [(b"big", str(big).encode(), {})]
    assert got[0][1]["reason"].startswith(b"too large for the broker")
    assert relay.proc.poll() is None


@pytest.mark.slow
def test_poll_relay_does_not_skip_a_late_commit(relay_settings, engine, relays):
    relay = relays("poll")
    relay.wait_role("leader")
    early = engine.connect()
    early_tx = early.begin()
    early_id = emit(early, aggregate_type="counter", aggregate_id="early", type="t",
                    payload={}, aggregate_version=1)  # lower seq, still uncommitted
    with engine.begin() as conn:
        late_id = emit(conn, aggregate_type="counter", aggregate_id="late", type="t",
                       payload={}, aggregate_version=1)
    got = read_topic(relay_settings.kafka_bootstrap, _topic(relay_settings), {str(late_id)})
    assert set(got.ids) == {str(late_id)}
    early_tx.commit()
    early.close()
    both = {str(early_id), str(late_id)}
    assert set(read_topic(relay_settings.kafka_bootstrap, _topic(relay_settings), both).ids) == both


@pytest.mark.slow
def test_idle_slot_is_advanced_and_metrics_exported(relay_settings, engine, relays):
    relay = relays("logical")
    relay.wait_role("leader")
    with engine.begin() as conn:
        eid = emit(conn, aggregate_type="counter", aggregate_id="a", type="t", payload={})
    read_topic(relay_settings.kafka_bootstrap, _topic(relay_settings), {str(eid)})
    dsn = libpq_dsn(relay_settings)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("create table filler (x text)")
        conn.execute("insert into filler select repeat('x', 1000) from generate_series(1, 5000)")
        written_to = conn.execute("select pg_current_wal_lsn()").fetchone()[0]
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            flushed = conn.execute(
                "select confirmed_flush_lsn from pg_replication_slots where slot_name = %s",
                (slot_name(relay_settings.db_schema),)).fetchone()[0]
            if flushed >= written_to:
                break
            time.sleep(0.3)
        assert flushed >= written_to, "an idle outbox must not pin WAL"
    metrics = relay.metrics()
    for name in ("outbox_relay_events_published_total", "outbox_relay_publish_latency_seconds",
                 "outbox_relay_slot_retained_wal_bytes",
                 "outbox_relay_oldest_unpublished_age_seconds"):
        assert name in metrics
    assert relay.terminate() == 0


def test_unknown_mode_is_a_cli_error():
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "outbox.cli", "relay", "--mode", "bogus"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "invalid choice" in r.stderr


