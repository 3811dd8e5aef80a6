"""The process roles against the real server: `outbox grants` applies (twice: idempotent),
each role can do its job, and PostgreSQL refuses each what it must not do."""

from __future__ import annotations

import os
import subprocess
import sys

import psycopg
import pytest
from psycopg import errors

from outbox.db import libpq_dsn
from outbox.pg_names import publication_name
from tests.db_roles import APP_URL, RELAY_URL, as_app, as_relay, role_name
from tests.relay_harness import ROOT


def _refused(conn: psycopg.Connection, sql: str, message: str) -> None:
    """`sql` fails with insufficient_privilege (42501) and `message`."""
    with pytest.raises(errors.InsufficientPrivilege) as refused:
        conn.execute(sql)
    assert message in str(refused.value)


def test_the_printed_grants_apply_as_the_owner_and_again(migrated):
    env = {**os.environ, "OUTBOX_DB_SCHEMA": migrated.db_schema}
    printed = subprocess.run(
        [sys.executable, "-m", "outbox.cli", "grants", "--app", role_name(APP_URL),
         "--relay", role_name(RELAY_URL)], env=env, cwd=ROOT, capture_output=True,
        text=True, timeout=60, check=True).stdout
    with psycopg.connect(libpq_dsn(migrated), autocommit=True) as owner:
        for _ in range(2):
            owner.execute(printed)
        acl = dict(owner.execute(
            "select c.relname, c.relacl::text from pg_class c join pg_namespace n on"
            " n.oid = c.relnamespace where n.nspname = %s and c.relkind = 'r'",
            (migrated.db_schema,)).fetchall())
    assert f"{role_name(RELAY_URL)}=rd/" in acl["outbox"]  # SELECT, DELETE; UPDATE by column
    assert role_name(APP_URL) not in acl["outbox"]
    assert f"{role_name(APP_URL)}=arwd/" in acl["image"]
    assert role_name(RELAY_URL) not in acl["image"]


def test_the_application_role_emits_and_writes_its_tables_and_nothing_else(migrated):
    schema, pub = migrated.db_schema, publication_name(migrated.db_schema)
    with psycopg.connect(libpq_dsn(as_app(migrated)), autocommit=True) as app:
        app.execute("select outbox_emit('doc', 'd-1', 'doc.saved', '{}'::jsonb)")
        app.execute("insert into result_cache (kind, checksum, engine, result)"
                    " values ('ocr', 'c', 'e', '{}')")
        app.execute("insert into processed_event (consumer, event_id)"
                    " values ('ocr', gen_random_uuid())")
        _refused(app, "create table app_table (id int)", "permission denied for schema")
        _refused(app, "select * from relay_slot", "permission denied for table relay_slot")
        _refused(app, "insert into outbox (id, aggregate_type, aggregate_id, type, payload)"
                      " values (gen_random_uuid(), 'a', 'b', 'c', '{}')",
                 "permission denied for table outbox")
        _refused(app, f'alter publication "{pub}" set (publish = \'insert, update\')',
                 "must be owner of publication")
        _refused(app, f'drop schema "{schema}" cascade', "must be owner of schema")
    with pytest.raises(psycopg.OperationalError,
                       match="must be superuser or replication role"):
        psycopg.connect(libpq_dsn(as_app(migrated)), replication="database").close()


def test_the_relay_role_publishes_and_keeps_its_books_and_nothing_else(migrated):
    schema, pub = migrated.db_schema, publication_name(migrated.db_schema)
    with psycopg.connect(libpq_dsn(migrated), autocommit=True) as owner:
        owner.execute("select outbox_emit('doc', 'd-1', 'doc.saved', '{}'::jsonb)")
    with psycopg.connect(libpq_dsn(as_relay(migrated)), autocommit=True) as relay:
        assert relay.execute("update outbox set published_at = now() returning seq"
                             ).fetchall()
        relay.execute("insert into relay_slot (slot_name, consistent_lsn, acked_lsn,"
                      " publication_fingerprint) values ('s', 0, 0, 'f')")
        relay.execute("delete from outbox")
        relay.execute("delete from processed_event")
        _refused(relay, "update outbox set payload = '{}'",
                 "permission denied for table outbox")
        _refused(relay, "insert into image_event (event_id, image_id, org_id, version, type,"
                        " state, attempts, traceparent) values (gen_random_uuid(),"
                        " gen_random_uuid(), 'o', 1, 't', 's', 0, 'tp')",
                 "permission denied for table image_event")
        _refused(relay, "update image set state = 'deleted'", "permission denied for table image")
        _refused(relay, f'create publication "{schema}_other" for table outbox',
                 "permission denied for database")
        _refused(relay, f'alter publication "{pub}" drop table outbox',
                 "must be owner of publication")
        _refused(relay, "select outbox_emit('doc', 'd-2', 'doc.saved', '{}'::jsonb)",
                 "permission denied for function outbox_emit")
        _refused(relay, "create table relay_table (id int)", "permission denied for schema")
        _refused(relay, f'drop schema "{schema}" cascade', "must be owner of schema")
    # REPLICATION: the logical relay may open a replication connection.
    psycopg.connect(libpq_dsn(as_relay(migrated)), replication="database").close()
