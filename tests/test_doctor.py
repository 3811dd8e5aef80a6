"""`outbox doctor` against real services: it passes on the local stack, and each check fails
when the thing it checks is broken."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import boto3
import psycopg
import pytest
from confluent_kafka.admin import AdminClient, NewTopic

from outbox.db import libpq_dsn
from outbox.doctor.findings import DoctorOptions, Finding
from outbox.doctor.kafka import kafka_checks
from outbox.doctor.postgres import postgres_checks
from outbox.kafka import TopicManager
from outbox.pg_names import OUTBOX_TABLE, publication_name, slot_name
from outbox.wire_formats import event_topic
from outbox_app.doctor_checks import redis_findings, s3_findings, search_findings
from outbox_app.views.search_index import aliased_indices, ensure_index
from tests.own_postgres import OwnPostgres
from tests.own_redis import OwnRedis
from tests.relay_harness import ROOT, drop_slot_and_publication, free_port, settings_env, superuser

# The warnings the local stack is expected to give (docs/operating/doctor.md).
LOCAL_STACK_WARNINGS = {"postgres.max_slot_wal_keep_size", "search.version"}
OPTIONS = DoctorOptions(timeout_s=3.0)


def _by_check(findings: list[Finding]) -> dict[str, Finding]:
    return {f.check: f for f in findings}


@pytest.fixture
def owner(migrated):
    """The test's settings with the owner's database URL (the stack's OUTBOX_DATABASE_URL)."""
    return migrated.model_copy(update={"database_url": os.environ["OUTBOX_DATABASE_URL"]})


@pytest.fixture
def relay_objects(owner):
    """The publication and the slot, as the logical relay leaves them."""
    migrated = owner
    with psycopg.connect(libpq_dsn(migrated), autocommit=True) as conn:
        name = publication_name(migrated.db_schema)
        if conn.execute("select 1 from pg_publication where pubname = %s",
                        (name,)).fetchone() is None:
            conn.execute(f'create publication "{name}" for table '
                         f'"{migrated.db_schema}".{OUTBOX_TABLE} with (publish = \'insert\')')
        conn.execute("select pg_create_logical_replication_slot(%s, 'pgoutput')",
                     (slot_name(migrated.db_schema),))
    yield migrated
    drop_slot_and_publication(migrated)


@pytest.fixture
def search_alias(migrated, es):
    ensure_index(es, migrated)
    yield migrated.es_index
    for index in aliased_indices(es, migrated.es_index):
        es.indices.delete(index=index)


def test_doctor_passes_on_the_local_stack(relay_objects, search_alias):
    settings = relay_objects
    TopicManager(settings).ensure(event_topic(settings, "image"))
    env = {**os.environ, **settings_env(settings), "OUTBOX_DATABASE_URL": settings.database_url}
    done = subprocess.run([sys.executable, "-m", "outbox.cli", "doctor", "--json"], env=env,
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    result = json.loads(done.stdout)
    statuses = {c["check"]: c["status"] for c in result["checks"]}
    warnings = {name for name, status in statuses.items() if status == "warn"}
    assert "fail" not in statuses.values(), done.stdout
    assert warnings <= LOCAL_STACK_WARNINGS, done.stdout
    assert done.returncode == result["exit_code"] == (1 if warnings else 0)
    for check in ("postgres.wal_level", "postgres.publication", "postgres.slot",
                  "postgres.role.owner", "postgres.migrations.outbox",
                  "postgres.migrations.images", "kafka.reachable", "kafka.topic_exists.image",
                  f"kafka.topic.{settings.topic_prefix}.image", "search.alias", "s3.bucket",
                  "s3.objects", "redis.reachable", "redis.maxmemory_policy"):
        assert statuses[check] == "pass", (check, done.stdout)


def test_doctor_exits_2_and_names_the_setting_when_kafka_is_unreachable(migrated):
    env = {**os.environ, **settings_env(migrated),
           "OUTBOX_KAFKA_BOOTSTRAP": f"127.0.0.1:{free_port()}"}
    done = subprocess.run([sys.executable, "-m", "outbox.cli", "doctor", "--timeout", "1",
                           "--json"], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2
    kafka = next(c for c in json.loads(done.stdout)["checks"] if c["check"] == "kafka.reachable")
    assert kafka["status"] == "fail" and "OUTBOX_KAFKA_BOOTSTRAP" in kafka["fix"]


def test_a_misconfigured_server_fails_logical_decoding_and_capacity_checks(settings):
    own = OwnPostgres({"wal_level": "replica", "max_wal_senders": "0",
                       "max_replication_slots": "1", "max_slot_wal_keep_size": "'64MB'"})
    try:
        own.start()
        bad = settings.model_copy(update={"database_url": own.url, "db_schema": "public"})
        with psycopg.connect(libpq_dsn(bad), autocommit=True) as conn:
            conn.execute("select pg_create_physical_replication_slot('taken')")
        found = _by_check(postgres_checks(OPTIONS, bad))
    finally:
        own.stop()
    assert found["postgres.reachable"].status == "pass"
    assert found["postgres.wal_level"].status == "fail"
    assert "wal_level = replica" in found["postgres.wal_level"].message
    assert "wal_level = logical" in found["postgres.wal_level"].fix
    capacity = found["postgres.replication_capacity"]
    assert capacity.status == "fail"
    assert "no free replication slot and no free WAL sender" in capacity.message
    keep = found["postgres.max_slot_wal_keep_size"]
    assert keep.status == "pass" and "64MB" in keep.message and "invalidated" in keep.message
    assert found["postgres.slot"].status == "warn"
    assert found["postgres.publication"].status == "fail"
    assert found["postgres.migrations.outbox"].status == "fail"
    assert "outbox migrate" in found["postgres.migrations.outbox"].fix
    assert found["postgres.role.owner"].status == "skip"


def test_a_wrong_password_fails_reachability_without_showing_it(owner):
    settings = owner
    url = settings.database_url.replace("://outbox:outbox@", "://outbox:not-the-password@")
    assert url != settings.database_url
    found = postgres_checks(OPTIONS, settings.model_copy(update={"database_url": url}))
    assert [(f.check, f.status) for f in found] == [("postgres.reachable", "fail")]
    assert "password authentication failed" in found[0].message
    assert "not-the-password" not in found[0].message
    assert "OUTBOX_DATABASE_URL" in found[0].fix


def test_a_dropped_publication_and_an_unmigrated_history_fail(relay_objects):
    settings = relay_objects
    with psycopg.connect(libpq_dsn(settings), autocommit=True) as conn:
        conn.execute(f'drop publication "{publication_name(settings.db_schema)}"')
        conn.execute(f'drop table "{settings.db_schema}".image_schema_version')
    found = _by_check(postgres_checks(OPTIONS, settings))
    assert found["postgres.publication"].status == "fail"
    assert "does not exist" in found["postgres.publication"].message
    assert "outbox migrate" in found["postgres.publication"].fix
    assert found["postgres.migrations.images"].status == "fail"
    assert found["postgres.migrations.outbox"].status == "pass"


@pytest.fixture
def login_role(owner, uid):
    """A fresh login role with USAGE on the test's schema and nothing else."""
    migrated = owner
    name, password = f"t_{uid}_role", "role-password"
    with superuser() as su:
        su.execute(f"create role {name} login password '{password}'")
        su.execute(f'grant usage on schema "{migrated.db_schema}" to {name}')
    url = migrated.database_url.replace("://outbox:outbox@", f"://{name}:{password}@")
    yield name, migrated.model_copy(update={"database_url": url})
    with superuser() as su:
        su.execute(f"drop owned by {name}")
        su.execute(f"drop role {name}")


def test_a_relay_role_without_replication_fails_then_passes(login_role, migrated):
    name, as_role = login_role
    schema = migrated.db_schema
    with superuser() as su:
        su.execute(f'grant select, delete on "{schema}".outbox to {name}')
        su.execute(f'grant select, insert, update on "{schema}".relay_slot to {name}')
    relay = DoctorOptions(role="relay", timeout_s=3.0)
    refused = _by_check(postgres_checks(relay, as_role))["postgres.role.relay"]
    assert refused.status == "fail" and "REPLICATION" in refused.message
    assert f"ALTER ROLE {name} REPLICATION" in refused.fix
    with superuser() as su:
        su.execute(f"alter role {name} replication")
    assert _by_check(postgres_checks(relay, as_role))["postgres.role.relay"].status == "pass"


def test_an_app_role_without_execute_on_outbox_emit_fails_then_passes(login_role, migrated):
    name, as_role = login_role
    app = DoctorOptions(role="app", timeout_s=3.0)
    refused = _by_check(postgres_checks(app, as_role))["postgres.role.app"]
    assert refused.status == "fail" and "EXECUTE on" in refused.message
    assert "outbox grants" in refused.fix
    with superuser() as su:
        su.execute(f'grant execute on all functions in schema "{migrated.db_schema}" to {name}')
    assert _by_check(postgres_checks(app, as_role))["postgres.role.app"].status == "pass"


def test_the_owner_as_a_long_running_process_warns(owner):
    found = _by_check(postgres_checks(DoctorOptions(role="app", timeout_s=3.0), owner))
    role = found["postgres.role.app"]
    assert role.status == "warn" and "owner" in role.message


def test_unreachable_kafka_fails(settings):
    bad = settings.model_copy(update={"kafka_bootstrap": f"127.0.0.1:{free_port()}"})
    found = kafka_checks(DoctorOptions(timeout_s=1.0), bad)
    assert [(f.check, f.status) for f in found] == [("kafka.reachable", "fail")]


def test_a_topic_with_finite_retention_fails_and_a_missing_one_warns(settings):
    topic = f"{settings.topic_prefix}.order"
    admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap})
    admin.create_topics([NewTopic(topic, 1, 1, config={"retention.ms": "60000",
                                                        "min.insync.replicas": "1"})]
                        )[topic].result(30)
    found = _by_check(kafka_checks(DoctorOptions(aggregate_types=("order", "invoice"),
                                                 timeout_s=5.0), settings))
    finite = found[f"kafka.topic.{topic}"]
    assert finite.status == "fail" and "retention.ms = 60000" in finite.message
    assert "retention.ms=-1" in finite.fix
    assert found["kafka.topic_exists.order"].status == "pass"
    assert found["kafka.topic_exists.invoice"].status == "warn"
    assert "outbox topics --create invoice" in found["kafka.topic_exists.invoice"].fix


def test_a_missing_alias_warns_and_an_index_in_its_place_fails(settings, es):
    missing = _by_check(search_findings(settings, 3.0))["search.alias"]
    assert missing.status == "warn" and "outbox rebuild search" in missing.fix
    es.indices.create(index=settings.es_index)
    try:
        taken = _by_check(search_findings(settings, 3.0))["search.alias"]
    finally:
        es.indices.delete(index=settings.es_index)
    assert taken.status == "fail" and "not an alias" in taken.message


def test_an_unreachable_search_server_fails(settings):
    bad = settings.model_copy(update={"es_url": f"http://127.0.0.1:{free_port()}"})
    found = search_findings(bad, 1.0)
    assert [(f.check, f.status) for f in found] == [("search.reachable", "fail")]
    assert found[0].fix == "OUTBOX_ES_URL"


def test_a_missing_bucket_fails(settings, uid):
    found = s3_findings(settings.model_copy(update={"s3_bucket": f"missing-{uid}"}), 3.0)
    assert [(f.check, f.status) for f in found] == [("s3.bucket", "fail")]
    assert "does not exist" in found[0].message and "OUTBOX_S3_BUCKET" in found[0].fix


def test_a_wrong_secret_key_fails(settings, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    # boto3's default session keeps the credentials it resolved first: a new one reads these.
    monkeypatch.setattr(boto3, "DEFAULT_SESSION", None)
    found = s3_findings(settings, 3.0)
    assert [(f.check, f.status) for f in found] == [("s3.bucket", "fail")]
    assert "AWS_SECRET_ACCESS_KEY" in found[0].fix
    assert "not-the-secret" not in found[0].message


def test_an_evicting_redis_warns_and_an_unreachable_one_fails(settings):
    own = OwnRedis("--maxmemory", "64mb", "--maxmemory-policy", "allkeys-lru")
    try:
        own.start()
        found = redis_findings(settings.model_copy(
            update={"redis_url": f"redis://127.0.0.1:{own.port}/0"}), 3.0)
    finally:
        own.stop()
    policy = _by_check(found)["redis.maxmemory_policy"]
    assert policy.status == "warn" and "allkeys-lru" in policy.message
    assert "noeviction" in policy.fix
    gone = redis_findings(settings.model_copy(
        update={"redis_url": f"redis://127.0.0.1:{own.port}/0"}), 1.0)
    assert [(f.check, f.status) for f in gone] == [("redis.reachable", "fail")]
