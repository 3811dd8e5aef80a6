"""The logical relay under publication, slot, schema and producer faults, against the real
PostgreSQL and broker: nothing committed is lost, nothing is silently skipped."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psycopg
import pytest
import requests
from confluent_kafka import KafkaError, Producer
from kafka import KafkaAdminClient, KafkaConsumer

from outbox import emit
from outbox.db import libpq_dsn
from outbox.kafka import dlq_topic, topic_name
from outbox.migrate import migrate
from outbox.pg_names import publication_name, slot_name
from relays.publisher import BatchPublisher
from relays.runner import RelayProcess
from tests.db_roles import as_relay
from tests.pipeline_harness import wait_for
from tests.relay_harness import (
    create_counter_table,
    drop_slot_and_publication,
    order_violations,
    read_topic,
    settings_env,
    superuser,
    write_load,
)

pytestmark = pytest.mark.slow


def _emit(engine, n: int, tag: str) -> set[str]:
    ids = set()
    for i in range(n):
        with engine.begin() as conn:
            ids.add(str(emit(conn, aggregate_type="counter", aggregate_id=f"{tag}-{i}",
                             type="t", payload={"i": i}, aggregate_version=1)))
    return ids


def _topic(settings) -> str:
    return topic_name(settings.topic_prefix, "counter")


def _slot(settings) -> tuple[str | None, str | None]:
    with psycopg.connect(libpq_dsn(settings)) as conn:
        row = conn.execute("select confirmed_flush_lsn::text, wal_status from"
                           " pg_replication_slots where slot_name = %s",
                           (slot_name(settings.db_schema),)).fetchone()
    return row if row else (None, None)


def _streaming(relay) -> None:
    relay.wait_role("leader")
    wait_for(lambda: _slot(relay.settings)[0] is not None, what="the slot exists")


def _waits_for_the_owner(relay) -> None:
    """The least-privileged relay may not repair the publication: it says so, not ready,
    its log naming the command that fixes it, and stays up."""
    wait_for(lambda: (relay.health() or {}).get("status") == "publication_missing",
             timeout_s=60, what="the relay reports the publication missing")
    ready = requests.get(f"http://127.0.0.1:{relay.port}/readyz", timeout=2)
    assert ready.status_code == 503
    assert ready.json()["checks"]["slot"] == {"status": "down", "code": "publication_missing"}
    logged = relay.log_path.read_text()
    assert "relay_publication_missing" in logged
    assert "run `outbox migrate` as the schema's owner" in logged
    assert "must be owner of publication" in logged or "permission denied" in logged
    assert relay.proc.poll() is None


def test_a_table_that_leaves_the_publication_loses_nothing(relay_settings, engine, relays):
    relay = relays("logical")
    _streaming(relay)
    first = _emit(engine, 3, "before")
    read_topic(relay_settings.kafka_bootstrap, _topic(relay_settings), first)
    with psycopg.connect(libpq_dsn(relay_settings), autocommit=True) as conn:  # the owner
        conn.execute(f'alter publication "{publication_name(relay_settings.db_schema)}" '
                     f'drop table "{relay_settings.db_schema}".outbox')
    gap = _emit(engine, 5, "gap")
    time.sleep(3 * relay_settings.relay_heartbeat_s)  # heartbeats come and go meanwhile
    _waits_for_the_owner(relay)
    migrate(relay_settings)  # the owner's repair
    after = _emit(engine, 2, "after")
    got = read_topic(relay_settings.kafka_bootstrap, _topic(relay_settings),
                     first | gap | after, timeout_s=60)
    assert gap <= set(got.ids), f"lost {len(gap - set(got.ids))} of the gap's rows"
    assert after <= set(got.ids)
    assert b"publication_changed" in relay.log_path.read_bytes()
    assert 'outbox_relay_slot_recreations_total{reason="publication_changed"} 1.0' in \
        relay.metrics()
    wait_for(lambda: relay.health()["status"] == "ok", timeout_s=30, what="healthy again")


def test_a_dropped_publication_waits_for_the_owner_and_its_gap_is_published(
        relay_settings, engine, relays):
    relay = relays("logical")
    _streaming(relay)
    with psycopg.connect(libpq_dsn(relay_settings), autocommit=True) as conn:  # the owner
        conn.execute(f'drop publication "{publication_name(relay_settings.db_schema)}"')
    gap = _emit(engine, 5, "gap")
    _waits_for_the_owner(relay)
    migrate(relay_settings)  # made again: the relay sees a new publication, new slot
    got = read_topic(relay_settings.kafka_bootstrap, _topic(relay_settings), gap, timeout_s=60)
    assert set(got.ids) == gap
    assert b"slot_recreating" in relay.log_path.read_bytes()
    assert 'outbox_relay_slot_recreations_total{reason="publication_changed"} 1.0' in \
        relay.metrics()
    # And the stream flows again afterwards.
    later = _emit(engine, 2, "later")
    assert later <= set(read_topic(relay_settings.kafka_bootstrap, _topic(relay_settings),
                                   later, timeout_s=30).ids)


def test_a_relay_that_owns_the_outbox_makes_a_dropped_publication_again(relay_settings,
                                                                        engine, relays):
    relay = relays("logical", OUTBOX_DATABASE_URL=relay_settings.database_url)
    _streaming(relay)
    with psycopg.connect(libpq_dsn(relay_settings), autocommit=True) as conn:
        conn.execute(f'drop publication "{publication_name(relay_settings.db_schema)}"')
    gap = _emit(engine, 5, "gap")
    got = read_topic(relay_settings.kafka_bootstrap, _topic(relay_settings), gap, timeout_s=60)
    assert set(got.ids) == gap
    assert b"publication_created" in relay.log_path.read_bytes()
    later = _emit(engine, 2, "later")
    assert later <= set(read_topic(relay_settings.kafka_bootstrap, _topic(relay_settings),
                                   later, timeout_s=30).ids)


def test_an_invalidated_slot_is_recreated_with_a_backfill(relay_settings, engine, relays):
    relay = relays("logical")
    _streaming(relay)
    first = _emit(engine, 2, "first")
    read_topic(relay_settings.kafka_bootstrap, _topic(relay_settings), first)
    wait_for(lambda: relay.health()["last_batch_at"], what="a batch acknowledged")
    time.sleep(2 * relay_settings.relay_heartbeat_s)  # the position is confirmed
    relay.terminate()
    missed = _emit(engine, 3, "while-down")
    with superuser() as su:
        su.execute("alter system set max_slot_wal_keep_size = '1MB'")
        su.execute("select pg_reload_conf()")
        try:
            su.execute("create table if not exists wal_filler (x text)")
            deadline = time.monotonic() + 60
            while _slot(relay_settings)[1] != "lost":
                assert time.monotonic() < deadline, "the slot was never invalidated"
                su.execute("insert into wal_filler select repeat('x', 2000)"
                           " from generate_series(1, 10000)")
                su.execute("select pg_switch_wal()")
                su.execute("checkpoint")
        finally:
            su.execute("alter system reset max_slot_wal_keep_size")
            su.execute("select pg_reload_conf()")
            su.execute("drop table if exists wal_filler")
    again = relays("logical")
    again.wait_role("leader")
    got = read_topic(relay_settings.kafka_bootstrap, _topic(relay_settings), first | missed,
                     timeout_s=60)
    assert missed <= set(got.ids), f"lost {len(missed - set(got.ids))}"
    wait_for(lambda: _slot(relay_settings)[1] in ("reserved", "extended"),
             what="a healthy slot again")
    assert b"invalidated" in again.log_path.read_bytes()


def test_a_foreign_slot_is_replaced_and_what_it_skipped_is_published(relay_settings, engine,
                                                                     relays):
    relay = relays("logical")
    _streaming(relay)
    first = _emit(engine, 2, "first")
    read_topic(relay_settings.kafka_bootstrap, _topic(relay_settings), first)
    time.sleep(2 * relay_settings.relay_heartbeat_s)
    relay.terminate()
    skipped = _emit(engine, 3, "skipped")
    with psycopg.connect(libpq_dsn(relay_settings), autocommit=True) as conn:
        name = slot_name(relay_settings.db_schema)
        conn.execute("select pg_drop_replication_slot(%s)", (name,))
        conn.execute("select pg_create_logical_replication_slot(%s, 'pgoutput')", (name,))
    again = relays("logical")
    again.wait_role("leader")
    got = read_topic(relay_settings.kafka_bootstrap, _topic(relay_settings), skipped,
                     timeout_s=60)
    assert skipped <= set(got.ids)
    assert b"foreign" in again.log_path.read_bytes()


def test_a_schema_change_stops_the_relay_loudly_without_a_crash_loop(relay_settings, engine,
                                                                     relays):
    relay = relays("logical")
    _streaming(relay)
    ok = _emit(engine, 1, "ok")
    read_topic(relay_settings.kafka_bootstrap, _topic(relay_settings), ok)
    time.sleep(2 * relay_settings.relay_heartbeat_s)
    with psycopg.connect(libpq_dsn(relay_settings), autocommit=True) as conn:
        conn.execute("alter table outbox rename column org_id to tenant_id")
        conn.execute("insert into outbox (id, aggregate_type, aggregate_id, type, payload)"
                     " values (gen_random_uuid(), 'counter', 'x', 't', '{}')")
    held = _slot(relay_settings)[0]
    wait_for(lambda: (relay.health() or {}).get("status") == "schema_mismatch", timeout_s=30,
             what="health reports the schema mismatch")
    time.sleep(3)
    assert relay.proc.poll() is None, "the relay must not exit (no crash loop)"
    assert _slot(relay_settings)[0] == held, "the slot must not move past the row"
    log = relay.log_path.read_text()
    assert "relay_schema_mismatch" in log and "no column org_id" in log
    assert log.count("relay_started") == 1  # it waits; it does not restart over and over


class BrokerRejectingProducerMock(Producer):
    """A real producer, except that the broker 'refuses' values containing REJECT-ME for
    good, as a broker whose topic limit is lower than the client's would (Tansu does not
    enforce topic limits, so the real server cannot be made to refuse)."""

    def __init__(self, config: dict) -> None:
        self._report = config["on_delivery"]
        super().__init__(config)

    def produce(self, topic, value=None, key=None, **kwargs):
        if value and b"REJECT-ME" in value and ".dlq." not in topic:
            self._report(KafkaError(KafkaError.MSG_SIZE_TOO_LARGE, "Broker: Message size too "
                                    "large", fatal=False, retriable=False),
                         _RefusedMessage(topic, key, value, kwargs.get("headers")))
            return
        super().produce(topic, value, key, **kwargs)


class UnknownBrokerErrorOnceProducerMock(Producer):
    """A real producer, except that the first value containing FLAKY is answered with
    "Unknown broker error", as Tansu answers a produce that races its topic's creation (the
    race cannot be produced on demand)."""

    answered = threading.Event()

    def __init__(self, config: dict) -> None:
        self._report = config["on_delivery"]
        super().__init__(config)

    def produce(self, topic, value=None, key=None, **kwargs):
        if value and b"FLAKY" in value and not self.answered.is_set():
            self.answered.set()
            self._report(KafkaError(KafkaError.UNKNOWN, "Unknown broker error", fatal=False,
                                    retriable=False),
                         _RefusedMessage(topic, key, value, kwargs.get("headers")))
            return
        super().produce(topic, value, key, **kwargs)


class FencedProducerMock(Producer):
    """A real producer that reports a fatal error (as a fenced idempotent producer does)
    after `FENCE_AFTER` messages, once per test: the broker here cannot be made to fence."""

    fenced = threading.Event()
    FENCE_AFTER = 50

    def __init__(self, config: dict) -> None:
        self._error_cb = config["error_cb"]
        self._count = 0
        super().__init__(config)

    def produce(self, topic, value=None, key=None, **kwargs):
        self._count += 1
        if self._count == self.FENCE_AFTER and not self.fenced.is_set():
            self.fenced.set()
            self._error_cb(KafkaError(KafkaError._FENCED, "Local: this instance has been "
                                      "fenced by a newer instance", fatal=True))
        super().produce(topic, value, key, **kwargs)


class _RefusedMessage:
    def __init__(self, topic, key, value, headers) -> None:
        self._t, self._k, self._v, self._h = topic, key, value, headers

    def topic(self):
        return self._t

    def key(self):
        return self._k

    def value(self):
        return self._v

    def headers(self):
        return self._h


def _in_process_relay(settings, producer_cls) -> tuple[RelayProcess, threading.Thread]:
    def factory(*args, **kwargs):
        return BatchPublisher(*args, producer_factory=producer_cls, **kwargs)

    relay = RelayProcess(as_relay(settings), "logical", publisher_factory=factory)
    thread = threading.Thread(target=relay.run, daemon=True)
    thread.start()
    wait_for(lambda: relay.leader, what="leader")
    return relay, thread


def test_a_message_the_broker_refuses_is_dead_lettered_and_the_rest_flows(relay_settings,
                                                                          engine):
    relay, thread = _in_process_relay(relay_settings, BrokerRejectingProducerMock)
    try:
        with engine.begin() as conn:
            bad = emit(conn, aggregate_type="counter", aggregate_id="bad", type="t",
                       payload={"note": "REJECT-ME"}, aggregate_version=1)
            good = emit(conn, aggregate_type="counter", aggregate_id="good", type="t",
                        payload={}, aggregate_version=1)
        got = read_topic(relay_settings.kafka_bootstrap, _topic(relay_settings), {str(good)})
        assert set(got.ids) == {str(good)}
        dlq = KafkaConsumer(dlq_topic(_topic(relay_settings), "relay"),
                            bootstrap_servers=relay_settings.kafka_bootstrap,
                            auto_offset_reset="earliest", consumer_timeout_ms=10_000)
        letters = [(dict(m.headers), json.loads(m.value)) for m in dlq]
        dlq.close()
        assert [(h["id"], v["payload"]) for h, v in letters] == \
            [(str(bad).encode(), {"note": "REJECT-ME"})]
        assert letters[0][0]["reason"].startswith(b"refused by the broker")
        later = _emit(engine, 3, "later")
        assert later <= set(read_topic(relay_settings.kafka_bootstrap, _topic(relay_settings),
                                       later).ids)
    finally:
        relay.stop.set()
        thread.join(30)
        drop_slot_and_publication(relay_settings)


def test_a_fenced_producer_is_replaced_and_nothing_is_lost(relay_settings, engine):
    FencedProducerMock.fenced.clear()
    create_counter_table(engine, aggregates=10)
    relay, thread = _in_process_relay(relay_settings, FencedProducerMock)
    try:
        load = write_load(engine, events=500, aggregates=10, threads=2)
        got = read_topic(relay_settings.kafka_bootstrap, _topic(relay_settings), load.committed)
        assert set(got.ids) == load.committed
        assert FencedProducerMock.fenced.is_set()
        assert relay.producers_replaced >= 1
        assert order_violations(got.versions) == []
    finally:
        relay.stop.set()
        thread.join(30)
        drop_slot_and_publication(relay_settings)


def test_a_hung_broker_is_waited_out_in_order_and_metrics_show_it(relay_settings, engine,
                                                                  relays):
    create_counter_table(engine, aggregates=5)
    relay = relays("logical")
    _streaming(relay)
    before = write_load(engine, events=100, aggregates=5, threads=2)
    read_topic(relay_settings.kafka_bootstrap, _topic(relay_settings), before.committed)
    broker_pid = int(Path(os.environ["OUTBOX_KAFKA_PID_FILE"]).read_text().split()[0])
    os.kill(broker_pid, signal.SIGSTOP)  # hung, not stopped: connections stay open
    try:
        during = write_load(engine, events=300, aggregates=5, threads=2, seed=2)
        wait_for(lambda: relay.health()["status"] == "failing", timeout_s=40,
                 what="health reports the outage")
        first = _metric(relay, "outbox_relay_oldest_unpublished_age_seconds")
        time.sleep(3)
        second = _metric(relay, "outbox_relay_oldest_unpublished_age_seconds")
        assert second > first > 0, (first, second)  # not frozen at its last good value
        assert _metric(relay, "outbox_relay_slot_lag_bytes") > 0
    finally:
        os.kill(broker_pid, signal.SIGCONT)
    expect = before.committed | during.committed
    got = read_topic(relay_settings.kafka_bootstrap, _topic(relay_settings), expect, 120)
    assert set(got.ids) == expect
    assert order_violations(got.versions) == []
    wait_for(lambda: relay.health()["status"] == "ok", timeout_s=30, what="healthy again")


def _metric(relay, name: str) -> float:
    for line in relay.metrics().splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not exported")


def _cli(settings, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, **settings_env(settings)}
    return subprocess.run([sys.executable, "-m", "outbox.cli", *args], env=env,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)


def test_relay_status_shows_the_slot_and_the_leader(relay_settings, engine, relays):
    relay = relays("logical")
    _streaming(relay)
    ok = _cli(relay_settings, "relay", "status", "--json")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    status = json.loads(ok.stdout)
    assert status["slot"]["slot_name"] == slot_name(relay_settings.db_schema)
    assert status["publication"]["covers_outbox"] is True
    assert status["leader"]["pid"] > 0 and status["problems"] == []
    relay.terminate()
    stopped = _cli(relay_settings, "relay", "status")
    assert stopped.returncode == 1 and "no relay holds the lock" in stopped.stdout


def test_relay_drop_retires_the_slot_without_loss_or_repeats(relay_settings, engine, relays):
    relay = relays("logical")
    _streaming(relay)
    busy = _cli(relay_settings, "relay", "drop", "--yes")
    assert busy.returncode == 1 and "stop it first" in busy.stderr
    first = _emit(engine, 3, "first")
    read_topic(relay_settings.kafka_bootstrap, _topic(relay_settings), first)
    relay.terminate()
    pending = _emit(engine, 4, "pending")  # only in the slot now
    # No terminal to confirm on and no --yes: nothing is touched.
    refused = _cli(relay_settings, "relay", "drop")
    assert refused.returncode == 2 and "pass --yes" in refused.stderr, refused.stderr
    with psycopg.connect(libpq_dsn(relay_settings)) as conn:
        assert conn.execute("select count(*) from pg_replication_slots where slot_name = %s",
                            (slot_name(relay_settings.db_schema),)).fetchone()[0] == 1
    done = _cli(relay_settings, "relay", "drop", "--yes", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["published_before_drop"] == 4  # the refusal drained none
    with psycopg.connect(libpq_dsn(relay_settings)) as conn:
        assert conn.execute("select count(*) from pg_replication_slots where slot_name = %s",
                            (slot_name(relay_settings.db_schema),)).fetchone()[0] == 0
        assert conn.execute("select count(*) from pg_publication where pubname = %s",
                            (publication_name(relay_settings.db_schema),)).fetchone()[0] == 0
        assert conn.execute("select count(*) from outbox where published_at is null"
                            ).fetchone()[0] == 0
    poll = relays("poll")
    poll.wait_role("leader")
    later = _emit(engine, 2, "later")
    got = read_topic(relay_settings.kafka_bootstrap, _topic(relay_settings),
                     first | pending | later)
    assert set(got.ids) == first | pending | later
    assert got.duplicates == 0  # poll mode did not publish the logical relay's rows again


def test_an_unknown_broker_error_is_retried_not_dead_lettered(relay_settings, engine):
    relay, thread = _in_process_relay(relay_settings, UnknownBrokerErrorOnceProducerMock)
    try:
        with engine.begin() as conn:
            flaky = emit(conn, aggregate_type="counter", aggregate_id="a", type="t",
                         payload={"note": "FLAKY"}, aggregate_version=1)
        got = read_topic(relay_settings.kafka_bootstrap, _topic(relay_settings), {str(flaky)})
        assert UnknownBrokerErrorOnceProducerMock.answered.is_set()
        assert str(flaky) in got.ids
    finally:
        relay.stop.set()
        thread.join(30)
    dlq = dlq_topic(_topic(relay_settings), "relay")
    admin = KafkaAdminClient(bootstrap_servers=relay_settings.kafka_bootstrap)
    try:
        assert dlq not in admin.list_topics(), "the event was dead-lettered"
    finally:
        admin.close()
