"""The exactly-once relay (`OUTBOX_RELAY_EXACTLY_ONCE`) against the real PostgreSQL and broker,
read back by kafka-python as a `read_committed` consumer: every committed event once, across
SIGKILLs, a position behind Kafka's, a zombie, and a PostgreSQL transaction published in
parts."""

from __future__ import annotations

import time

import psycopg
import pytest
from kafka import KafkaConsumer, TopicPartition
from sqlalchemy import text

from outbox.db import libpq_dsn
from outbox.pg_names import slot_name
from relays.admin import relay_status
from relays.checkpointer import kafka_position, transactional_id
from relays.logical import LogicalRelay
from relays.publisher import BatchPublisher, PublishError
from relays.replication import ReplicationError, int_to_lsn
from tests.pipeline_harness import wait_for
from tests.relay_harness import (
    committed_transactions,
    create_counter_table,
    load_in_background,
    read_transactional,
    write_load,
)

pytestmark = pytest.mark.slow


@pytest.fixture
def eo_settings(relay_settings):
    """The test's settings with the exactly-once relay, and a positions topic of its own (a
    reader walks the whole topic back, and the shared one holds every test's positions)."""
    return relay_settings.model_copy(update={
        "relay_exactly_once": True,
        "relay_positions_topic": f"{relay_settings.topic_prefix}.relay-positions"})


@pytest.fixture
def eo_env(eo_settings) -> dict[str, str]:
    """The environment of a relay process with `eo_settings`' delivery."""
    return {"OUTBOX_RELAY_EXACTLY_ONCE": "true",
            "OUTBOX_RELAY_POSITIONS_TOPIC": eo_settings.relay_positions_topic}


def _topic(settings) -> str:
    return f"{settings.topic_prefix}.counter"


def _txn_id(settings) -> str:
    txn_id = transactional_id(settings, libpq_dsn(settings))
    assert txn_id is not None
    return txn_id


def _position(settings) -> dict | None:
    """The position the relay committed in Kafka (its group's offsets on the positions
    topic's partitions 0 to 3), None before the first commit."""
    consumer = KafkaConsumer(bootstrap_servers=settings.kafka_bootstrap,
                             group_id=_txn_id(settings), enable_auto_commit=False)
    try:
        offsets = [consumer.committed(TopicPartition(settings.relay_positions_topic, p))
                   for p in range(4)]
    finally:
        consumer.close()
    if None in offsets:
        return None
    end_lsn, commit_lsn, rows, txn = offsets
    return {"end_lsn": end_lsn, "commit_lsn": commit_lsn,
            "rows": None if rows == 0 else rows - 1, "txn": txn}


def _read(settings, expect: set[str]):
    return read_transactional(settings.kafka_bootstrap, _topic(settings), expect,
                              _txn_id(settings), settings.relay_positions_topic)


def test_every_committed_event_once_in_committed_transactions(eo_settings, eo_env, engine, relays):
    create_counter_table(engine, aggregates=30)
    relay = relays("logical", **eo_env)
    relay.wait_role("leader")
    load = write_load(engine, events=5000, aggregates=30, threads=6)
    got = _read(eo_settings, load.committed)
    assert set(got.committed) == load.committed  # nothing lost, no rollback leaked
    assert got.duplicates == 0 and got.untagged == 0
    assert got.transactions > 1
    position = _position(eo_settings)
    assert position is not None and position["rows"] is None and position["end_lsn"] > 0
    # `outbox relay status` shows the mode and what Kafka holds.
    delivery = relay_status(eo_settings)["delivery"]
    assert delivery["mode"] == "exactly-once" and delivery["transactional_id"] == _txn_id(
        eo_settings)
    assert delivery["kafka_position"]["end_lsn"] == int_to_lsn(position["end_lsn"])
    assert relay.terminate() == 0


def test_sigkills_leave_no_duplicate_among_committed_transactions(eo_settings, eo_env, engine,
                                                                  relays):
    create_counter_table(engine, aggregates=20)
    writer, load = load_in_background(engine, events=6000, aggregates=20, threads=4)
    kills = 0
    while writer.is_alive() or kills < 3:
        relay = relays("logical", **eo_env)
        relay.wait_publishing()  # killed while streaming (a killed backfill repeats)
        time.sleep(0.7)
        relay.kill()
        kills += 1
    writer.join()
    relays("logical", **eo_env).wait_role("leader")
    got = _read(eo_settings, load.committed)
    assert set(got.committed) == load.committed
    assert got.duplicates == 0


def test_what_kafka_holds_beyond_the_database_record_is_skipped(eo_settings, eo_env, engine,
                                                                relays):
    """A relay commits its batches in Kafka and dies before recording any in the database:
    its successor starts from the older record, and skips what Kafka holds."""
    create_counter_table(engine, aggregates=10)
    dsn = libpq_dsn(eo_settings)
    publisher = BatchPublisher(eo_settings, stop_requested=lambda: False,
                               transactional_id=_txn_id(eo_settings))
    dying = LogicalRelay(eo_settings, dsn, publisher)
    try:
        dying.setup()
        first = write_load(engine, events=1500, aggregates=10, threads=3)
        published = 0
        while published < len(first.committed):
            dying.processor.new_batch()
            dying.listener.read(dying.processor, 10**6, 2.0)
            dying.checkpointer.batch_done(dying.processor)  # committed in Kafka only
            published += dying.processor.events
    finally:
        dying.close()
        publisher.close()
    with psycopg.connect(dsn) as conn:
        recorded = conn.execute("select acked_lsn from relay_slot where slot_name = %s",
                                (slot_name(eo_settings.db_schema),)).fetchone()[0]
    position = _position(eo_settings)
    assert position is not None and recorded < position["end_lsn"]
    relay = relays("logical", **eo_env)
    relay.wait_role("leader")
    second = write_load(engine, events=500, aggregates=10, threads=2, seed=2)
    everything = first.committed | second.committed
    got = _read(eo_settings, everything)
    assert set(got.committed) == everything
    assert got.duplicates == 0


def test_a_zombie_relay_is_fenced(eo_settings, engine):
    """Two relays of one outbox (one that lost its lock and did not notice): the second's
    take-over fences the first, whose transaction then cannot commit."""
    create_counter_table(engine, aggregates=5)
    eo_settings = eo_settings.model_copy(update={"relay_transaction_timeout_ms": 5000})
    dsn = libpq_dsn(eo_settings)
    txn_id = _txn_id(eo_settings)
    zombie_pub = BatchPublisher(eo_settings, stop_requested=lambda: False,
                                transactional_id=txn_id)
    zombie = LogicalRelay(eo_settings, dsn, zombie_pub)
    leader_pub = BatchPublisher(eo_settings, stop_requested=lambda: False,
                                transactional_id=txn_id)
    leader = LogicalRelay(eo_settings, dsn, leader_pub)
    try:
        zombie.setup()
        load = write_load(engine, events=200, aggregates=5, threads=1, rollback_every=10**9)
        # The zombie reads the batch and produces it, then stalls before committing.
        zombie.processor.new_batch()
        while zombie.processor.events < len(load.committed):
            zombie.listener.read(zombie.processor, 10**6, 2.0)
        zombie.listener.close()
        # Takes the transactional id over (once the zombie's walsender let the slot go).
        wait_for(lambda: _set_up(leader), timeout_s=30, what="the leader's stream")
        wait_for(lambda: leader.run_once() == 0 and leader.acked_lsn > 0, timeout_s=30,
                 what="the leader's batch")
        zombie_txn = zombie_pub.txn_id
        assert zombie_txn is not None  # its batch is in an open transaction
        if not _commit_visible(eo_settings, txn_id, timeout_s=30):
            pytest.skip("broker defect (docs/operating/relays.md#broker-caveats): the "
                        "leader's commit was acknowledged, yet its position and records "
                        "stay hidden from read_committed readers")
        # Fenced: on Apache Kafka the commit fails as fatal; this broker answers a fenced
        # producer's commit with a timeout, and its abort too (then it is given up as fatal).
        with pytest.raises(PublishError):
            zombie.checkpointer.commit_kafka(zombie.processor.position(),
                                             zombie.processor.seq)
        got = _read(eo_settings, load.committed)
        assert set(got.committed) == load.committed
        assert got.duplicates == 0
        # What the error alone cannot tell: the zombie's transaction did not commit, and the
        # position Kafka holds is still the leader's.
        chain, _ = committed_transactions(eo_settings.kafka_bootstrap,
                                          eo_settings.relay_positions_topic, txn_id)
        assert zombie_txn not in chain
        assert leader.checkpointer.last_committed_txn in chain
    finally:
        leader.close()
        leader_pub.close()
        zombie.close()
        zombie_pub.close()
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("select pg_drop_replication_slot(slot_name) from pg_replication_slots"
                         " where slot_name = %s", (slot_name(eo_settings.db_schema),))


def _commit_visible(settings, txn_id: str, timeout_s: float) -> bool:
    """Whether the position the relay `txn_id` committed shows to a reader in time."""
    deadline = time.monotonic() + timeout_s
    while kafka_position(settings, txn_id) is None:
        if time.monotonic() > deadline:
            return False
        time.sleep(1)
    return True


def _set_up(relay: LogicalRelay) -> bool:
    try:
        relay.setup()
        return True
    except (ReplicationError, psycopg.Error):
        return False


def test_a_large_transaction_published_in_parts_resumes_inside_it(eo_settings, eo_env, engine,
                                                                  relays):
    """A PostgreSQL transaction of 20,000 events with at most 2,000 per Kafka transaction:
    the relay is killed once a part is committed, and its successor resumes after the rows
    Kafka holds, inside the same PostgreSQL transaction."""
    create_counter_table(engine, aggregates=1)
    parts = {"OUTBOX_RELAY_TRANSACTION_MAX_EVENTS": "2000", **eo_env}
    relay = relays("logical", **parts)
    relay.wait_publishing()  # the slot exists: the transaction comes through the stream
    with engine.begin() as conn:
        ids = conn.execute(text(
            "select outbox_emit('counter', '0', 'counter.bumped', jsonb_build_object('n', g),"
            " g) from generate_series(1, 20000) g")).scalars().all()
    expect = {str(i) for i in ids}
    wait_for(lambda: (_position(eo_settings) or {}).get("rows") is not None, timeout_s=60,
             what="a committed part")
    relay.kill()
    relay = relays("logical", **parts)
    relay.wait_role("leader")
    got = _read(eo_settings, expect)
    assert set(got.committed) == expect
    assert got.duplicates == 0
    assert got.partial_positions >= 1
    # The successor finishes the transaction: the position in Kafka is after it, whole.
    wait_for(lambda: (_position(eo_settings) or {}).get("end_lsn", 0) > 0, timeout_s=30,
             what="a position after the transaction")
    assert _position(eo_settings)["rows"] is None
