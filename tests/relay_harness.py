"""Test harness for relays: load generators, relay processes, and reading topics back with
kafka-python (a client independent of the relay's confluent-kafka)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
import requests
from kafka import KafkaConsumer, TopicPartition
from sqlalchemy import text
from sqlalchemy.engine import Engine

from outbox import emit
from outbox.db import libpq_dsn
from outbox.pg_names import publication_name, slot_name
from outbox_app.settings import AppSettings
from tests.db_roles import RELAY_URL, role_url

ROOT = Path(__file__).resolve().parent.parent


def create_counter_table(engine: Engine, aggregates: int) -> None:
    """A table of aggregates whose row lock serializes the writers of one aggregate."""
    with engine.begin() as conn:
        conn.execute(text("create table agg (id int primary key, version int not null)"))
        conn.execute(text("insert into agg select g, 0 from generate_series(0, :n - 1) g"),
                     {"n": aggregates})


@dataclass
class LoadResult:
    committed: set[str] = field(default_factory=set)
    rolled_back: set[str] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)


def write_load(engine: Engine, *, events: int, aggregates: int, threads: int,
               rollback_every: int = 7, per_tx: int = 3, result: LoadResult | None = None,
               seed: int = 1) -> LoadResult:
    """`events` events from concurrent transactions of 1..per_tx events each; every
    `rollback_every`-th transaction rolls back. Each event bumps its aggregate's version
    (row lock first, then the outbox row, as the application does)."""
    result = result or LoadResult()
    budget = iter(range(events))
    budget_lock = threading.Lock()

    def take(n: int) -> int:
        got = 0
        with budget_lock:
            for _ in range(n):
                if next(budget, None) is None:
                    break
                got += 1
        return got

    def worker(wid: int) -> None:
        rnd = random.Random(seed * 1000 + wid)
        tx = 0
        while True:
            n = take(rnd.randint(1, per_tx))
            if n == 0:
                return
            tx += 1
            rollback = tx % rollback_every == 0
            ids = []
            conn = engine.connect()
            trans = conn.begin()
            # Locks taken in id order: concurrent transactions cannot deadlock.
            for agg in sorted(rnd.randrange(aggregates) for _ in range(n)):
                version = conn.execute(text(
                    "update agg set version = version + 1 where id = :id returning version"),
                    {"id": agg}).scalar_one()
                eid = emit(conn, aggregate_type="counter", aggregate_id=str(agg),
                           type="counter.bumped", aggregate_version=version, org_id="o",
                           payload={"agg": agg, "version": version, "pad": "x" * 64})
                ids.append(str(eid))
            if rollback:
                trans.rollback()
            else:
                trans.commit()
            conn.close()
            with result.lock:
                (result.rolled_back if rollback else result.committed).update(ids)

    pool = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return result


@dataclass
class TopicRead:
    ids: Counter = field(default_factory=Counter)
    versions: dict[str, list[int]] = field(default_factory=lambda: defaultdict(list))
    headers_ok: bool = True

    @property
    def duplicates(self) -> int:
        return sum(c - 1 for c in self.ids.values())


def assign_from_start(consumer: KafkaConsumer, topic: str, deadline: float) -> bool:
    """Assign every partition of `topic` to `consumer` from its start, once the topic exists
    (False when it did not by `deadline`)."""
    parts = None
    while not parts and time.monotonic() < deadline:
        parts = consumer.partitions_for_topic(topic)
        if not parts:
            time.sleep(0.5)
    if not parts:
        return False
    consumer.assign([TopicPartition(topic, p) for p in parts])
    consumer.seek_to_beginning()
    return True


def load_in_background(engine: Engine, **kwargs: int) -> tuple[threading.Thread, LoadResult]:
    """`write_load` on a thread of its own (started); its result fills in as it goes."""
    result = LoadResult()
    writer = threading.Thread(target=write_load, args=(engine,),
                              kwargs={**kwargs, "result": result})
    writer.start()
    return writer, result


def read_topic(bootstrap: str, topic: str, expect: set[str], timeout_s: float = 90) -> TopicRead:
    """Read `topic` from the beginning with kafka-python until every id in `expect` was
    seen (or the timeout passes); record per-aggregate versions in partition order."""
    out = TopicRead()
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                             consumer_timeout_ms=1000)
    deadline = time.monotonic() + timeout_s
    if not assign_from_start(consumer, topic, deadline):
        consumer.close()
        return out
    while time.monotonic() < deadline and not expect <= set(out.ids):
        for msg in consumer:
            try:
                env = json.loads(msg.value)
                env["id"], env["aggregate_version"]
            except (ValueError, KeyError, TypeError):
                continue  # not an envelope (a poison message some test produced)
            out.ids[env["id"]] += 1
            out.versions[msg.key.decode()].append(env["aggregate_version"])
            hdrs = dict(msg.headers)
            if hdrs.get("id") != env["id"].encode() or "traceparent" not in hdrs:
                out.headers_ok = False
    consumer.close()
    return out


def order_violations(versions: dict[str, list[int]]) -> list[str]:
    """Per aggregate, a version never arrives before its predecessor did; a redelivered run
    (after a relay restart) may repeat versions already sent. Returns the violations."""
    bad = []
    for agg, seq in versions.items():
        high = 0
        for i, v in enumerate(seq):
            if v > high + 1:
                bad.append(f"aggregate {agg}: {v} after {high} at {i}: {seq[max(0, i-5):i+5]}")
            high = max(high, v)
    return bad


class RelayProc:
    """`outbox relay` as a child process with its own settings, connected as the relay's
    role (an OUTBOX_DATABASE_URL in `extra_env` overrides it)."""

    def __init__(self, settings: AppSettings, mode: str, log_path: Path, **extra_env: str):
        # --log-level, not a setting: an unknown OUTBOX_ variable would stop the relay.
        log_level = extra_env.pop("OUTBOX_LOG_LEVEL", "INFO")
        env = {**os.environ, **settings_env(settings),
               "OUTBOX_DATABASE_URL": role_url(RELAY_URL), **extra_env}
        self.settings = settings
        self.log_path = log_path
        self.log = open(log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.port = free_port()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "outbox.cli", "relay", "--mode", mode, "--log-level",
             log_level,
             "--metrics-port", str(self.port)],
            env=env, stdout=self.log, stderr=subprocess.STDOUT, cwd=ROOT)

    def health(self) -> dict | None:
        return health_of(self.port)

    def metrics(self) -> str:
        return requests.get(f"http://127.0.0.1:{self.port}/metrics", timeout=2).text

    def wait_role(self, role: str, timeout_s: float = 30) -> float:
        start = time.monotonic()
        while time.monotonic() - start < timeout_s:
            h = self.health()
            if h and h.get("role") == role:
                return time.monotonic() - start
            time.sleep(0.1)
        raise AssertionError(f"relay never became {role}")

    def wait_publishing(self, timeout_s: float = 60) -> None:
        """Wait until this relay leads with its slot set up (ready on /readyz)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                if requests.get(f"http://127.0.0.1:{self.port}/readyz",
                                timeout=1).status_code == 200 and self.health()["role"] == "leader":
                    return
            except (requests.RequestException, TypeError):
                pass
            time.sleep(0.1)
        raise AssertionError("the relay never started publishing")

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def terminate(self, timeout_s: float = 30) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout_s)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.log.close()


def drop_slot_and_publication(settings: AppSettings) -> None:
    """Remove what a logical relay of these settings made in the database (tests' cleanup:
    a slot left behind would pin WAL for every later test)."""
    with psycopg.connect(libpq_dsn(settings), autocommit=True) as conn:
        conn.execute("select pg_drop_replication_slot(slot_name) from pg_replication_slots "
                     "where slot_name = %s", (slot_name(settings.db_schema),))
        conn.execute(f'drop publication if exists "{publication_name(settings.db_schema)}"')


def superuser() -> psycopg.Connection:
    """A superuser session of the stack's cluster (local socket, trust), for faults only an
    administrator can cause: server settings, checkpoints, invalidating a slot."""
    return psycopg.connect(host=os.environ["OUTBOX_PG_SOCKET_DIR"],
                           port=int(os.environ.get("OUTBOX_PG_PORT", "15432")),
                           user="postgres", dbname="outbox", autocommit=True)


def settings_env(settings: AppSettings) -> dict[str, str]:
    """The environment that gives a child process these settings."""
    return {
        "OUTBOX_DB_SCHEMA": settings.db_schema,
        "OUTBOX_TOPIC_PREFIX": settings.topic_prefix,
        "OUTBOX_ES_INDEX": settings.es_index,
        "OUTBOX_REDIS_PREFIX": settings.redis_prefix,
        "OUTBOX_S3_BUCKET": settings.s3_bucket,
        "OUTBOX_RELAY_POLL_INTERVAL_S": str(settings.relay_poll_interval_s),
        "OUTBOX_RELAY_LOCK_POLL_S": str(settings.relay_lock_poll_s),
        "OUTBOX_RELAY_HEARTBEAT_S": str(settings.relay_heartbeat_s),
        "OUTBOX_API_KEYS": settings.api_keys.get_secret_value(),
    }


def health_of(port: int) -> dict | None:
    """The `/healthz` report of a process on 127.0.0.1:port (None while it does not answer)."""
    try:
        return requests.get(f"http://127.0.0.1:{port}/healthz", timeout=1).json()
    except requests.RequestException:
        return None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stack(*command: str) -> None:
    """Run an `infra/stack.sh` command (stop-broker, start-broker, down postgres...)."""
    subprocess.run([str(ROOT / "infra" / "stack.sh"), *command], check=True,
                   capture_output=True)


@dataclass
class TransactionalRead:
    """A topic read by an exactly-once consumer, its records told apart by the Kafka
    transaction each belongs to (header `outbox_kafka_txn`): `committed` counts the events
    of committed transactions, `leaked` those of aborted ones the broker let through."""

    committed: Counter = field(default_factory=Counter)
    leaked: Counter = field(default_factory=Counter)
    untagged: int = 0  # records without the header (written outside any transaction)
    transactions: int = 0  # committed transactions found on the position chain
    partial_positions: int = 0  # committed positions inside a large PostgreSQL transaction

    @property
    def duplicates(self) -> int:
        return sum(c - 1 for c in self.committed.values())


def committed_transactions(bootstrap: str, positions_topic: str, txn_id: str
                           ) -> tuple[set[int], int]:
    """The ids of the committed Kafka transactions of the relay `txn_id`, and how many of
    them committed a part of a PostgreSQL transaction. The group offset the relay commits
    in each transaction names the last one (a transactional offset commit is visible only
    once committed, on this broker too); each position record names the one before it, so
    the chain from the last one back is every committed transaction, and a position record
    off the chain is an aborted transaction's."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=txn_id,
                             enable_auto_commit=False, consumer_timeout_ms=2000,
                             isolation_level="read_committed")
    try:
        last = consumer.committed(TopicPartition(positions_topic, 3))  # the txn's id
        if last is None:
            return set(), 0
        parts = consumer.partitions_for_topic(positions_topic) or set()
        consumer.assign([TopicPartition(positions_topic, p) for p in parts])
        consumer.seek_to_beginning()
        positions = {}
        for msg in consumer:
            if msg.key == txn_id.encode():
                record = json.loads(msg.value)
                positions[record["txn"]] = record
    finally:
        consumer.close()
    chain, partial, txn = set(), 0, last
    while txn is not None and txn not in chain:
        chain.add(txn)
        record = positions.get(txn)
        if record is None:
            raise AssertionError(f"no position record of committed transaction {txn}")
        partial += record.get("rows") is not None
        txn = record["prev_txn"]
    return chain, partial


def read_transactional(bootstrap: str, topic: str, expect: set[str], txn_id: str,
                       positions_topic: str = "outbox-relay-positions",
                       timeout_s: float = 90) -> TransactionalRead:
    """Read `topic` from the beginning with kafka-python as a `read_committed` consumer
    until every id in `expect` was seen among the committed transactions' records (or the
    timeout passes)."""
    out = TransactionalRead()
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                             consumer_timeout_ms=1000, isolation_level="read_committed")
    seen: list[tuple[str, bytes | None]] = []
    deadline = time.monotonic() + timeout_s
    try:
        if not assign_from_start(consumer, topic, deadline):
            return out
        ids: set[str] = set()
        while True:
            for msg in consumer:
                try:
                    event_id = json.loads(msg.value)["id"]
                except (ValueError, KeyError, TypeError):
                    continue  # not an envelope
                seen.append((event_id, dict(msg.headers).get("outbox_kafka_txn")))
                ids.add(event_id)
            if not expect <= ids and time.monotonic() < deadline:
                continue  # the chain is read once everything expected arrived in some form
            chain, out.partial_positions = committed_transactions(bootstrap, positions_topic,
                                                                  txn_id)
            out.committed, out.leaked, out.untagged = Counter(), Counter(), 0
            for event_id, txn in seen:
                if txn is None:
                    out.untagged += 1
                elif int(txn) in chain:
                    out.committed[event_id] += 1
                else:
                    out.leaked[event_id] += 1
            out.transactions = len(chain)
            if expect <= set(out.committed) or time.monotonic() > deadline:
                return out
    finally:
        consumer.close()
