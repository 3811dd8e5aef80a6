"""`outbox_emit` from other languages' clients: psql and Node's `pg` (tests/node)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from sqlalchemy import text
from sqlalchemy.engine.url import make_url

from tests.relay_harness import read_topic

NODE_CLIENT = Path(__file__).resolve().parent / "node" / "emit.js"
TRACE = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def _libpq_url(settings) -> str:
    """OUTBOX_DATABASE_URL (SQLAlchemy form) as a libpq URL; its search_path is left alone,
    so the clients call the function by its schema-qualified name."""
    return make_url(settings.database_url).set(drivername="postgresql").render_as_string(
        hide_password=False)


def _psql(settings, sql: str) -> subprocess.CompletedProcess:
    return subprocess.run(["psql", _libpq_url(settings), "-X", "-q", "-t", "-A",
                           "-v", "ON_ERROR_STOP=1", "-c", sql],
                          capture_output=True, text=True, timeout=30)


def _node(settings, commit: bool, traceparent: str | None = None, **args) -> \
        subprocess.CompletedProcess:
    spec = {"url": _libpq_url(settings), "schema": settings.db_schema, "commit": commit,
            "traceparent": traceparent, "args": args}
    return subprocess.run(["node", str(NODE_CLIENT), json.dumps(spec)],
                          capture_output=True, text=True, timeout=30)


def _rows(engine) -> dict[str, dict]:
    with engine.connect() as conn:
        return {str(r["id"]): dict(r) for r in
                conn.execute(text("select * from outbox")).mappings()}


def test_psql_commit_arrives_rollback_does_not_bad_argument_refused(relay_settings, engine,
                                                                    relays):
    fn = f'"{relay_settings.db_schema}".outbox_emit'
    relay = relays("logical")
    relay.wait_role("leader")
    done = _psql(relay_settings, f"begin; set local outbox.traceparent = '{TRACE}'; "
                 f"select {fn}(aggregate_type => 'counter', aggregate_id => 'c1', "
                 "type => 'counter.bumped', payload => '{\"n\": 1}', aggregate_version => 1);"
                 " commit;")
    assert done.returncode == 0, done.stderr
    committed = done.stdout.strip()
    undone = _psql(relay_settings, f"begin; select {fn}('counter', 'c1', 'counter.bumped', "
                   "'{\"n\": 2}', 2); rollback;")
    assert undone.returncode == 0, undone.stderr
    bad = _psql(relay_settings, f"select {fn}('counter', 'c1', 'counter.bumped', '{{}}', -5)")
    assert bad.returncode != 0
    assert "outbox_emit: aggregate_version must not be negative, got -5" in bad.stderr
    rows = _rows(engine)
    assert list(rows) == [committed]
    assert rows[committed]["headers"] == {"traceparent": TRACE}
    got = read_topic(relay_settings.kafka_bootstrap, f"{relay_settings.topic_prefix}.counter",
                     {committed}, timeout_s=30)
    assert set(got.ids) == {committed}


def test_node_pg_commit_arrives_rollback_does_not_bad_argument_refused(migrated, engine):
    args = {"aggregate_type": "order", "aggregate_id": "o-9", "type": "order.created",
            "payload": {"total": 3, "note": "über"}, "aggregate_version": 1}
    done = _node(migrated, commit=True, traceparent=TRACE, **args)
    assert done.returncode == 0, done.stderr
    undone = _node(migrated, commit=False, **args)
    assert undone.returncode == 0, undone.stderr
    bad = _node(migrated, commit=True, **{**args, "aggregate_id": ""})
    assert bad.returncode == 1
    assert "outbox_emit: aggregate_id must be a non-empty text" in bad.stderr
    rows = _rows(engine)
    assert list(rows) == [done.stdout.strip()]
    row = rows[done.stdout.strip()]
    assert (row["payload"], row["aggregate_version"], row["headers"]) == (
        args["payload"], 1, {"traceparent": TRACE})
