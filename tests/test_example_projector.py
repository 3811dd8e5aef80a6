"""The example projector (examples/audit_log), installed through its entry point and run
by `outbox project audit-log` as a process against the real services: events emitted in a
transaction reach its table in another database once each; a poison message goes to its
dead-letter topic; it answers /healthz, /readyz and /metrics; SIGTERM drains, exit 0."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
import requests
from confluent_kafka import Consumer, Producer, TopicPartition
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from outbox.db import make_engine
from outbox.emit import emit
from outbox.envelope import EventEnvelope
from outbox.kafka import dlq_topic, topic_name
from tests.pipeline_harness import wait_for
from tests.relay_harness import ROOT, free_port, health_of, settings_env

pytestmark = pytest.mark.slow
TYPES = ("ledger", "invoice")


@pytest.fixture
def audit_db(base_settings, uid) -> Iterator[str]:
    """A database of its own for the audit log, dropped after the test."""
    name = f"outbox_audit_{uid}"
    admin = create_engine(base_settings.database_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    yield make_url(base_settings.database_url).set(database=name).render_as_string(
        hide_password=False)
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE "{name}" WITH (FORCE)'))
    admin.dispose()


def _rows(url: str) -> list[tuple[str, str, int]]:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            if not conn.execute(text("select to_regclass('audit_log')")).scalar():
                return []
            return [tuple(r) for r in conn.execute(text(
                "select event_id::text, aggregate_type, aggregate_version from audit_log"))]
    finally:
        engine.dispose()


def _metric(port: int, name: str) -> float:
    for line in requests.get(f"http://127.0.0.1:{port}/metrics", timeout=2).text.splitlines():
        if line.startswith(f'{name}{{projector="audit-log"}}'):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def _dead_letters(settings, topic: str) -> list[tuple[dict[str, bytes], bytes]]:
    """Every message of a dead-letter topic: its headers and value."""
    c = Consumer({"bootstrap.servers": settings.kafka_bootstrap, "group.id": uuid.uuid4().hex,
                  "enable.auto.commit": False})
    try:
        parts = c.list_topics(topic, timeout=10).topics[topic].partitions
        c.assign([TopicPartition(topic, p, 0) for p in parts])
        letters, empty = [], 0
        while empty < 3:
            msg = c.poll(1.0)
            if msg is None:
                empty += 1
            elif msg.error() is None:
                letters.append((dict(msg.headers() or []), msg.value()))
        return letters
    finally:
        c.close()


def test_the_example_projector_runs_as_an_installed_projector(relays, relay_settings,
                                                              audit_db, tmp_path):
    s = relay_settings
    relays("logical").wait_role("leader")
    engine = make_engine(s)
    emitted = {}
    with engine.begin() as conn:  # the events commit with the caller's transaction
        for i, aggregate_type in enumerate((*TYPES, "ledger")):
            aggregate_id = str(uuid.uuid4())
            event_id = emit(conn, aggregate_type=aggregate_type, aggregate_id=aggregate_id,
                            type=f"{aggregate_type}.recorded", payload={"n": i},
                            aggregate_version=1)
            emitted[str(event_id)] = (aggregate_type, aggregate_id)
    with engine.begin() as conn:  # an aggregate type the projector is not configured for
        emit(conn, aggregate_type="other", aggregate_id="x", type="other.recorded",
             payload={})
    engine.dispose()

    port = free_port()
    log = open(tmp_path / "audit-log.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [sys.executable, "-m", "outbox.cli", "project", "audit-log", "--metrics-port",
         str(port)],
        env={**os.environ, **settings_env(s), "AUDIT_LOG_DATABASE_URL": audit_db,
             "AUDIT_LOG_AGGREGATE_TYPES": ",".join(TYPES)},
        cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: len(_rows(audit_db)) == 3, timeout_s=60, what="events in the log")
        assert {r[0]: r[1] for r in _rows(audit_db)} == \
            {i: t for i, (t, _) in emitted.items()}

        # A redelivery (same event id) adds no row; a poison message (a payload PostgreSQL
        # refuses) is dead-lettered after its retries.
        first_id = next(iter(emitted))
        aggregate_type, aggregate_id = emitted[first_id]
        topic = topic_name(s.topic_prefix, aggregate_type)
        poison = EventEnvelope(id=uuid.uuid4(), type="ledger.recorded",
                               aggregate_type=aggregate_type, aggregate_id=aggregate_id,
                               aggregate_version=2, occurred_at=datetime.now(UTC),
                               payload={"note": "nul \u0000 byte"})
        again = EventEnvelope(id=uuid.UUID(first_id), type="ledger.recorded",
                              aggregate_type=aggregate_type, aggregate_id=aggregate_id,
                              aggregate_version=1, occurred_at=datetime.now(UTC),
                              payload={"n": 0})
        producer = Producer({"bootstrap.servers": s.kafka_bootstrap})
        for env in (again, poison):
            producer.produce(topic, key=aggregate_id.encode(), value=env.to_json())
        assert producer.flush(10) == 0
        # Same key, so one partition: once the poison message is committed, the
        # redelivery before it was applied too.
        wait_for(lambda: _metric(port, "outbox_projector_dead_letters_total") >= 1
                 and _metric(port, "outbox_projector_events_applied_total") >= 5,
                 timeout_s=60, what="the poison message dead-lettered and committed")
        assert len(_rows(audit_db)) == 3
        letters = _dead_letters(s, dlq_topic(topic, "audit-log"))
        assert len(letters) == 1
        headers, value = letters[0]
        assert EventEnvelope.from_json(value).id == poison.id
        assert headers["reason"].startswith(b"apply failed:")
        assert headers["projector"] == b"audit-log"

        health = health_of(port)
        assert health["status"] == "ok" and health["projector"] == "audit-log"
        ready = requests.get(f"http://127.0.0.1:{port}/readyz", timeout=5)
        assert ready.status_code == 200, ready.text
        assert {"broker", "audit_database", "group"} <= set(ready.json()["checks"])

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        log.close()
    assert b"projector_stopped" in (tmp_path / "audit-log.log").read_bytes()
