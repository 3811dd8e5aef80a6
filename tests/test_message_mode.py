"""OUTBOX_EMIT_MODE=message: events as logical-decoding messages, read by the logical relay
from the same stream; what the row-reading commands say instead."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import psycopg
from sqlalchemy import text

from outbox.db import libpq_dsn
from outbox.migrate import store_emit_mode
from outbox.pg_names import slot_name
from tests.relay_harness import (
    ROOT,
    LoadResult,
    create_counter_table,
    read_topic,
    settings_env,
    write_load,
)


def _message_mode(settings) -> None:
    store_emit_mode(settings.model_copy(update={"emit_mode": "message"}))


def _wait_for_slot(settings, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    with psycopg.connect(libpq_dsn(settings), autocommit=True) as conn:
        while time.monotonic() < deadline:
            if conn.execute("select 1 from pg_replication_slots where slot_name = %s",
                            (slot_name(settings.db_schema),)).fetchone():
                return
            time.sleep(0.1)
    raise AssertionError("the relay never made its slot")


def _topic(settings) -> str:
    return f"{settings.topic_prefix}.counter"


def test_sigterm_and_restart_resend_nothing(relay_settings, engine, relays):
    _message_mode(relay_settings)
    create_counter_table(engine, aggregates=10)
    relay = relays("logical")
    relay.wait_role("leader")
    _wait_for_slot(relay_settings)
    first = write_load(engine, events=300, aggregates=10, threads=2)
    got = read_topic(relay_settings.kafka_bootstrap, _topic(relay_settings), first.committed)
    assert set(got.ids) == first.committed and got.duplicates == 0 and got.headers_ok
    with engine.connect() as conn:
        assert conn.execute(text("select count(*) from outbox")).scalar_one() == 0
    assert relay.terminate() == 0
    relays("logical").wait_role("leader")
    second = write_load(engine, events=30, aggregates=10, threads=1, seed=5)
    expect = first.committed | second.committed
    got = read_topic(relay_settings.kafka_bootstrap, _topic(relay_settings), expect)
    assert set(got.ids) == expect
    assert got.duplicates == 0, "a restarted relay re-sent messages"
    # `relay status` says why it counts no waiting rows, instead of a misleading 0.
    env = {**os.environ, **settings_env(relay_settings)}
    done = subprocess.run([sys.executable, "-m", "outbox.cli", "relay", "status"],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert "no outbox rows in message mode" in done.stdout, done.stdout + done.stderr


def test_sigkill_during_load_loses_nothing_and_keeps_order(relay_settings, engine, relays):
    _message_mode(relay_settings)
    create_counter_table(engine, aggregates=40)
    relay = relays("logical")
    relay.wait_role("leader")
    _wait_for_slot(relay_settings)  # emitting is refused until it exists
    load = LoadResult()
    writer = threading.Thread(target=write_load, args=(engine,),
                              kwargs={"events": 8000, "aggregates": 40, "threads": 4,
                                      "result": load})
    writer.start()
    kills = 0
    while writer.is_alive() or kills < 5:
        time.sleep(0.3 + 0.2 * kills)
        relay.kill()
        kills += 1
        relay = relays("logical")
        relay.wait_role("leader")
    writer.join()
    got = read_topic(relay_settings.kafka_bootstrap, _topic(relay_settings), load.committed)
    assert set(got.ids) == load.committed, f"lost {len(load.committed - set(got.ids))}"
    assert not set(got.ids) & load.rolled_back
    # Redelivery after a kill repeats a run already sent; a version never comes before its
    # predecessor, and every version 1..n of each aggregate arrived.
    with engine.connect() as conn:
        final = dict(conn.execute(text("select id::text, version from agg")).all())
    for agg, versions in got.versions.items():
        high = 0
        for v in versions:
            assert v <= high + 1, f"aggregate {agg}: {v} after {high}"
            high = max(high, v)
        assert sorted(set(versions)) == list(range(1, final[agg] + 1))
    print(f"message mode: {kills} kills, {len(load.committed)} events, "
          f"{got.duplicates} duplicates")


def test_poll_relay_refuses_message_mode(migrated):
    _message_mode(migrated)
    env = {**os.environ, **settings_env(migrated)}
    done = subprocess.run([sys.executable, "-m", "outbox.cli", "relay", "--mode", "poll"],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "message mode" in done.stderr and "run the logical relay" in done.stderr
