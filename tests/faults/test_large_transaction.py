"""A PostgreSQL transaction too large for one Kafka transaction, through the exactly-once
relay: 1,000,000 events (`make faults`; 20,000 in `make test`) committed at once, published
in Kafka transactions of `relay_transaction_max_events`, the relay SIGKILLed once a part is
committed. Its successor resumes inside the transaction: every event once, as read by an
independent `read_committed` client."""

from __future__ import annotations

import time

import pytest
from kafka import KafkaConsumer, TopicPartition
from sqlalchemy import text

from outbox.db import libpq_dsn
from outbox.kafka import TopicManager, topic_name
from relays.checkpointer import transactional_id
from tests.faults.dead_letters import dead_letters
from tests.faults.report import EXACTLY_ONCE, FULL, Outcome, scale
from tests.pipeline_harness import wait_for
from tests.relay_harness import read_transactional

pytestmark = pytest.mark.slow


def _parts_committed(settings, txn_id: str) -> int:
    """The rows of the open PostgreSQL transaction Kafka holds (0 when none)."""
    consumer = KafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, group_id=txn_id,
                             enable_auto_commit=False)
    try:
        rows = consumer.committed(TopicPartition(settings.relay_positions_topic, 2))
    finally:
        consumer.close()
    return 0 if not rows else rows - 1


def test_a_transaction_larger_than_a_kafka_transaction(relay_settings, engine, relays, record):
    events = int(scale(1_000_000, 20_000))
    per_kafka_txn = int(scale(100_000, 5_000))
    # A positions topic of its own: the reader walks it back whole.
    settings = relay_settings.model_copy(update={
        "relay_exactly_once": True,
        "relay_positions_topic": topic_name(relay_settings.topic_prefix, "relay-positions")})
    txn_id = transactional_id(settings, libpq_dsn(settings))
    assert txn_id is not None
    topic = topic_name(settings.topic_prefix, "counter")
    TopicManager(settings).ensure(topic)
    env = {"OUTBOX_RELAY_EXACTLY_ONCE": "true",
           "OUTBOX_RELAY_POSITIONS_TOPIC": settings.relay_positions_topic,
           "OUTBOX_RELAY_TRANSACTION_MAX_EVENTS": str(per_kafka_txn)}
    relay = relays("logical", **env)
    relay.wait_publishing()
    started = time.monotonic()
    with engine.begin() as conn:
        ids = conn.execute(text(
            "select outbox_emit('counter', (g % 20)::text, 'counter.bumped',"
            " jsonb_build_object('n', g)) from generate_series(1, :n) g"),
            {"n": events}).scalars().all()
    written_s = time.monotonic() - started
    committed = {str(i) for i in ids}
    wait_for(lambda: _parts_committed(settings, txn_id) > 0, timeout_s=scale(600, 120),
             what="a committed part of the transaction")
    held_at_kill = _parts_committed(settings, txn_id)
    relay.kill()
    relays("logical", **env).wait_publishing()
    fault_end = time.monotonic()
    got = read_transactional(settings.kafka_bootstrap, topic, committed, txn_id,
                             settings.relay_positions_topic, timeout_s=scale(1800, 300))
    out = Outcome("large transaction", f"one PostgreSQL transaction of {events:,} events, "
                  f"at most {per_kafka_txn:,} per Kafka transaction; relay SIGKILLed once "
                  "a part was committed", committed=len(committed),
                  in_kafka=len(committed & got.committed.keys()), duplicates=got.duplicates,
                  dead_letters=dead_letters(settings), recover_s=time.monotonic() - fault_end,
                  delivery=EXACTLY_ONCE, leaked_records=sum(got.leaked.values()),
                  leaked_events=len(got.leaked))
    out.notes.append(f"the transaction took {written_s:.1f} s to write; the relay was killed "
                     f"with {held_at_kill:,} of its events committed in Kafka; "
                     f"{got.partial_positions} committed positions inside it")
    if got.partial_positions < (2 if FULL else 1):
        out.violations.append("the transaction was not published in parts")
    record(out)
