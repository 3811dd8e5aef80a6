"""`outbox_emit(...)`, the SQL function: the same row as `emit`, clear refusals, the caller's
trace, any search_path, an execute-only role, and message mode's refusal without a slot."""

from __future__ import annotations

import psycopg
import pytest
from psycopg.types.json import Jsonb
from sqlalchemy import text

from outbox import emit
from outbox.db import libpq_dsn
from outbox.migrate import store_emit_mode
from tests.relay_harness import superuser

TRACE = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
COLUMNS = ("aggregate_type", "aggregate_id", "type", "aggregate_version", "org_id",
           "payload", "headers", "published_at")


def _plain(migrated) -> psycopg.Connection:
    """A session whose search_path does not hold the outbox's schema."""
    dsn = libpq_dsn(migrated).replace(f"search_path={migrated.db_schema}", "search_path=public")
    return psycopg.connect(dsn)


def _fn(migrated) -> str:
    return f'"{migrated.db_schema}".outbox_emit'


def _row(engine, event_id) -> dict:
    with engine.connect() as conn:
        return dict(conn.execute(text("select * from outbox where id = :id"),
                                 {"id": event_id}).mappings().one())


def test_the_function_writes_the_row_emit_writes(migrated, engine):
    args = dict(aggregate_type="order", aggregate_id="o-1", type="order.created",
                payload={"total": 10, "lines": [{"sku": "a"}]}, aggregate_version=2,
                org_id="acme", headers={"x-source": "test"})
    with engine.begin() as conn:
        from_python = emit(conn, **args)
    with _plain(migrated) as conn:
        (from_sql,) = conn.execute(
            f"select {_fn(migrated)}(aggregate_type => %s, aggregate_id => %s, type => %s,"
            " payload => %s, aggregate_version => %s, org_id => %s, headers => %s)",
            ("order", "o-1", "order.created", Jsonb(args["payload"]), 2, "acme",
             Jsonb(args["headers"]))).fetchone()
    a, b = _row(engine, from_python), _row(engine, from_sql)
    assert {c: a[c] for c in COLUMNS} | {"headers": None} == \
        {c: b[c] for c in COLUMNS} | {"headers": None}
    for row in (a, b):
        assert row["headers"]["x-source"] == "test"
        assert len(row["headers"]["traceparent"]) == 55
    assert b["seq"] == a["seq"] + 1 and b["created_at"] >= a["created_at"]


def test_defaults_and_the_callers_trace(migrated, engine):
    with _plain(migrated) as conn:
        conn.execute(f"set local outbox.traceparent = '{TRACE}'")
        (traced,) = conn.execute(f"select {_fn(migrated)}('order', 'o-2', 'order.paid', "
                                 "'{}')").fetchone()
        (explicit,) = conn.execute(
            f"select {_fn(migrated)}('order', 'o-2', 'order.shipped', '{{}}', "
            f"headers => %s)", (Jsonb({"traceparent": TRACE.replace("b7", "c7")}),)).fetchone()
        conn.commit()
        (fresh,) = conn.execute(f"select {_fn(migrated)}('order', 'o-2', 'order.closed', "
                                "'{}')").fetchone()  # SET LOCAL ended with its transaction
        conn.commit()
    assert _row(engine, traced)["headers"] == {"traceparent": TRACE}
    assert _row(engine, explicit)["headers"]["traceparent"] == TRACE.replace("b7", "c7")
    fresh_row = _row(engine, fresh)
    assert fresh_row["headers"]["traceparent"][3:35] != TRACE[3:35]
    assert fresh_row["aggregate_version"] is None and fresh_row["org_id"] is None


@pytest.mark.parametrize(("call", "message"), [
    ("null, 'a', 't', '{}'", "aggregate_type must be a non-empty text"),
    ("'', 'a', 't', '{}'", "aggregate_type must be a non-empty text"),
    ("'o', null, 't', '{}'", "aggregate_id must be a non-empty text"),
    ("'o', 'a', '', '{}'", "type must be a non-empty text"),
    ("'o', 'a', 't', null", "payload must not be NULL"),
    ("'o', 'a', 't', '{}', -1", "aggregate_version must not be negative, got -1"),
    ("'o', 'a', 't', '{}', headers => '[1]'", "headers must be a JSON object, got array"),
    ("'o', 'a', 't', '{}', headers => '{\"traceparent\": \"00-abc\"}'",
     "malformed traceparent '00-abc'"),
    ("'o', 'a', 't', '{}', headers => '{\"traceparent\": \"00-" + "0" * 32 + "-" + "1" * 16
     + "-01\"}'", "malformed traceparent"),
])
def test_bad_arguments_are_refused_clearly(migrated, engine, call, message):
    with _plain(migrated) as conn, pytest.raises(psycopg.errors.InvalidParameterValue,
                                                 match=message):
        conn.execute(f"select {_fn(migrated)}({call})")
    with engine.connect() as conn:
        assert conn.execute(text("select count(*) from outbox")).scalar_one() == 0


def test_a_malformed_trace_setting_is_refused(migrated):
    with _plain(migrated) as conn, pytest.raises(psycopg.errors.InvalidParameterValue,
                                                 match="malformed traceparent 'nope'"):
        conn.execute("set local outbox.traceparent = 'nope'")
        conn.execute(f"select {_fn(migrated)}('o', 'a', 't', '{{}}')")


def test_a_role_that_may_only_execute_it_can_emit(migrated, engine, uid):
    role = f"t_{uid}_app"
    with superuser() as su:
        su.execute(f'create role "{role}" nologin')
        try:
            su.execute(f'grant usage on schema "{migrated.db_schema}" to "{role}"')
            with pytest.raises(psycopg.errors.InsufficientPrivilege), su.transaction():
                su.execute(f'set local role "{role}"')
                su.execute(f"select {_fn(migrated)}('o', 'a', 't', '{{}}')")
            su.execute(f"grant execute on function {_fn(migrated)} to \"{role}\"")
            with pytest.raises(psycopg.errors.InsufficientPrivilege), su.transaction():
                su.execute(f'set local role "{role}"')
                su.execute(f'select count(*) from "{migrated.db_schema}".outbox')
            with su.transaction():
                su.execute(f'set local role "{role}"')
                (event_id,) = su.execute(
                    f"select {_fn(migrated)}('o', 'a', 't', '{{\"k\": 1}}')").fetchone()
        finally:
            su.execute(f'drop owned by "{role}"')
            su.execute(f'drop role "{role}"')
    assert _row(engine, event_id)["payload"] == {"k": 1}


def test_message_mode_refuses_to_emit_without_a_slot(migrated, engine):
    store_emit_mode(migrated.model_copy(update={"emit_mode": "message"}))
    with pytest.raises(Exception, match="message mode needs the replication slot") as err, \
            engine.begin() as conn:
        emit(conn, aggregate_type="o", aggregate_id="a", type="t", payload={})
    assert err.value.orig.sqlstate == "55000"
    with engine.connect() as conn:
        assert conn.execute(text("select count(*) from outbox")).scalar_one() == 0


def test_migrate_stores_only_an_explicit_emit_mode(migrated):
    from outbox.migrate import migrate
    from outbox.settings import Settings

    def stored() -> str:
        with psycopg.connect(libpq_dsn(migrated)) as conn:
            return conn.execute("select emit_mode from outbox_config").fetchone()[0]

    migrate(migrated.model_copy(update={"emit_mode": "message"}))
    assert stored() == "message"
    # An upgrade run without OUTBOX_EMIT_MODE keeps the deployment's mode.
    implicit = Settings(database_url=migrated.database_url, db_schema=migrated.db_schema)
    assert "emit_mode" not in implicit.model_fields_set
    migrate(implicit)
    assert stored() == "message"
    migrate(migrated.model_copy(update={"emit_mode": "table"}))
    assert stored() == "table"
