"""Pipeline benchmark against the real local stack: the outbox's cost to an application, the
whole pipeline from upload to searchable, and the latency of each hop.

- `outbox_overhead`: application transactions that update one row, with `emit` in the same
  transaction against the same transactions without it, from concurrent clients; rounds of
  each in turn (the order alternating), the ratio taken pair by pair; in table mode (the
  key's own figures) and in message mode (`message`, with a slot made for the run), and
  `emit` through `outbox_emit` against its own INSERT (`function_vs_insert`).
- `pipeline`: the API, the relay and the four projectors as separate processes, as deployed.
  A burst of generated images (half English, half Chinese, each with text of its own, so no
  result-cache hits) is uploaded through the HTTP API with presigned POSTs by 4 clients;
  then images at a steady low rate (one every 2 s), where the time to searchable is the
  latency of the pipeline and not a queue. Per image: from the first request to searchable
  (the search view holds the database's version of the embedded image, checked every
  50 ms), and the time of each stage from the events' commit times.
- `concurrency`: a burst of 24 images with one OCR recognition at a time against the default
  concurrency (the usable cores), in pairs, each through processes of its own.
- `hop_latency`: during the steady phase, from an event's commit to the start of its apply
  by each projector (`outbox_projector_pickup_seconds`, quantiles interpolated within the
  histogram's buckets as Prometheus does), and the relay's commit to broker
  acknowledgement; then the same steady phase through a second pipeline whose projectors
  ask the broker for new messages every 50 ms (`hop_latency_fast_fetch`).

Writes bench/results/pipeline.{json,md} (--quick: quick.pipeline.{json,md}, ignored by git).

    python -m bench.pipeline            # 200 images, 30 at one per 2 s, 2 pairs of 24; 5 of 5 s
    python -m bench.pipeline --quick    # 6 images, then 3, 1 pair of 6; 1 of 1 s (CI)
"""

from __future__ import annotations

import json
import os
import platform
import random
import socket
import statistics
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import requests
from elasticsearch import Elasticsearch
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import insert, text
from sqlalchemy.engine import Engine

from bench.cli import bench_main
from bench.workers import bodies
from outbox.db import make_engine
from outbox.emit import emit
from outbox.pg_names import slot_name
from outbox.tables import outbox_table
from outbox_app.demo import Processes, Upload, stage_times, start_pipeline, submit
from outbox_app.settings import AppSettings
from tests.auth import AUTH_A
from tests.pipeline_harness import isolated_settings
from tests.relay_harness import settings_env

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
PROJECTORS = ("ocr", "embed", "search", "cache")
ACCOUNTS = 1000  # rows the overhead clients update, at random
FAST_FETCH_WAIT_MS = 50


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spread(values: list[float], digits: int = 3) -> dict[str, Any]:
    return {"median": round(statistics.median(values), digits),
            "spread": [round(min(values), digits), round(max(values), digits)]}


# --- outbox_overhead -------------------------------------------------------------------

def _insert_row(conn: Any, **event: Any) -> None:
    """The event as `emit` wrote it before it called `outbox_emit`: its own INSERT."""
    conn.execute(_INSERT, {"id": uuid.uuid4(), **event,
                           "headers": {"traceparent": f"00-{os.urandom(16).hex()}-"
                                                      f"{os.urandom(8).hex()}-01"}})


_INSERT = insert(outbox_table)


def _transactions(engine: Engine, emitter: Callable[..., Any] | None, clients: int,
                  seconds: float) -> float:
    """Transactions per second of `clients` threads, each updating one random row per
    transaction (and emitting its event through `emitter`, when given), for `seconds`."""
    counts = [0] * clients
    deadline = time.monotonic() + seconds

    def client(n: int) -> None:
        rnd = random.Random(n)
        while time.monotonic() < deadline:
            with engine.begin() as conn:
                account = rnd.randrange(ACCOUNTS)
                balance = conn.execute(
                    text("update bench_account set balance = balance + 1, updated_at = now()"
                         " where id = :id returning balance"), {"id": account}).scalar_one()
                if emitter is not None:
                    emitter(conn, aggregate_type="account", aggregate_id=str(account),
                            type="account.credited", aggregate_version=balance,
                            payload={"id": account, "balance": balance}, org_id="org-bench")
            counts[n] += 1

    start = time.monotonic()
    threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(counts) / (time.monotonic() - start)


# The cases of `outbox_overhead`: (emit mode stored in the database, how the event is written).
_CASES: dict[str, tuple[str, Callable[..., Any] | None]] = {
    "without": ("table", None), "table": ("table", emit), "message": ("message", emit),
    "insert": ("table", _insert_row)}


def _figures(base: list[float], other: list[float], key: str) -> dict[str, Any]:
    ratios = [o / b for o, b in zip(other, base, strict=True)]
    return {f"tx_per_s_{key}": _spread(other, 1)["median"], "ratio": _spread(ratios)["median"],
            "ratio_spread": _spread(ratios)["spread"]}


def outbox_overhead(rounds: int, seconds: float, clients: int = 4) -> dict[str, Any]:
    """Transactions with `emit` against the same without it, pair by pair, in table mode and
    in message mode (with a slot made for the run, and dropped after), and `emit` through
    `outbox_emit` against its own INSERT. Returns the table mode's figures with
    `message` and `function_vs_insert` inside."""
    with isolated_settings("bovh") as s:
        engine = make_engine(s, pool_size=clients)
        slot = slot_name(s.db_schema)
        with engine.begin() as conn:
            conn.execute(text("create table bench_account (id int primary key, balance bigint"
                              " not null, updated_at timestamptz not null)"))
            conn.execute(text("insert into bench_account select g, 0, now()"
                              " from generate_series(0, :n - 1) g"), {"n": ACCOUNTS})
        with engine.begin() as conn:  # a slot is made in a transaction that wrote nothing
            conn.execute(text("select pg_create_logical_replication_slot(:s, 'pgoutput')"),
                         {"s": slot})
        try:
            _transactions(engine, emit, clients, min(seconds, 1.0))  # warm the pool, caches
            runs: dict[str, list[float]] = {case: [] for case in _CASES}
            for r in range(rounds):
                order = list(_CASES) if r % 2 == 0 else list(reversed(_CASES))
                for case in order:
                    mode, emitter = _CASES[case]
                    with engine.begin() as conn:
                        conn.execute(text("update outbox_config set emit_mode = :m"), {"m": mode})
                    runs[case].append(_transactions(engine, emitter, clients, seconds))
        finally:
            with engine.begin() as conn:
                conn.execute(text("select pg_drop_replication_slot(:s)"), {"s": slot})
            engine.dispose()
    table = _figures(runs["without"], runs["table"], "with_emit")
    return {"clients": clients, "rounds": rounds, "seconds_per_run": seconds,
            "tx_per_s_without": _spread(runs["without"], 1)["median"], **table,
            "message": _figures(runs["without"], runs["message"], "with_emit"),
            "function_vs_insert": _figures(runs["insert"], runs["table"], "function")
            | {"tx_per_s_insert": _spread(runs["insert"], 1)["median"]}}


# --- pipeline and hop_latency ----------------------------------------------------------

class SearchableWatch:
    """Notes when each image becomes searchable: embedded in the database, and the search
    view holding that version (what `GET /v1/images/{id}` calls searchable)."""

    def __init__(self, settings: AppSettings, engine: Engine) -> None:
        self._settings = settings
        self._engine = engine
        self._es = Elasticsearch(settings.es_url)

    def wait(self, uploads: list[Upload], timeout_s: float, interval_s: float = 0.05) -> None:
        """Until every upload is searchable (its `searchable_at` set), or fail."""
        deadline = time.monotonic() + timeout_s
        while self.check(uploads):
            if time.monotonic() > deadline:
                raise RuntimeError(f"images not searchable in {timeout_s} s")
            time.sleep(interval_s)

    def check(self, uploads: list[Upload]) -> int:
        """Note the uploads found searchable now; return how many are still not."""
        pending = {u.id: u for u in uploads if u.searchable_at is None}
        if pending:
            with self._engine.connect() as conn:
                rows = conn.execute(text("select id::text, version, state from image"
                                         " where id = any(cast(:ids as uuid[]))"),
                                    {"ids": list(pending)}).all()
            failed = [r.id for r in rows if r.state in ("ocr_failed", "embedding_failed")]
            if failed:
                raise RuntimeError(f"images failed: {failed[:3]}")
            embedded = {r.id: r.version for r in rows if r.state == "embedded"}
            if embedded:
                got = self._es.mget(index=self._settings.es_index, ids=list(embedded),
                                    source=False)
                now = time.time()
                for doc in got["docs"]:
                    if doc.get("found") and doc["_version"] == embedded[doc["_id"]]:
                        pending.pop(doc["_id"]).searchable_at = now
        return len(pending)

    def close(self) -> None:
        """Release the search client."""
        self._es.close()


STAGES = [("upload_confirm_s", None, "image.ocr_requested"),
          ("queue_to_ocr_s", "image.ocr_requested", "image.ocr_started"),
          ("ocr_s", "image.ocr_started", "image.ocr_completed"),
          ("to_embedded_s", "image.ocr_completed", "image.embedded"),
          ("to_searchable_s", "image.embedded", None)]


def _phase_figures(uploads: list[Upload]) -> dict[str, Any]:
    """Throughput, latency quantiles and per-stage medians of one phase."""
    totals = sorted(u.searchable_at - u.submitted for u in uploads)
    first = min(u.submitted for u in uploads)
    last = max(u.searchable_at for u in uploads)
    stages = {}
    for name, begin, end in STAGES:
        values = [(u.stages[end] if end else u.searchable_at)
                  - (u.stages[begin] if begin else u.submitted) for u in uploads]
        stages[name] = round(statistics.median(values), 3)
    return {"images": len(uploads), "seconds": round(last - first, 2),
            "images_per_s": round(len(uploads) / (last - first), 3),
            "p50_s": round(statistics.median(totals), 3),
            "p95_s": round(totals[min(len(totals) - 1, int(0.95 * len(totals)))], 3),
            "max_s": round(totals[-1], 3), "stages": stages}


def _histograms(url: str, name: str) -> dict[str, dict[float, float]]:
    """Cumulative bucket counts of histogram `name` on a /metrics page, by label set."""
    out: dict[str, dict[float, float]] = {}
    body = requests.get(url, timeout=5).text
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            if sample.name == f"{name}_bucket":
                key = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items())
                               if k != "le")
                out.setdefault(key, {})[float(sample.labels["le"])] = sample.value
    return out


def _counter(url: str, name: str) -> float:
    """The sum of counter `name` over its label sets on a /metrics page."""
    body = requests.get(url, timeout=5).text
    return sum(sample.value for family in text_string_to_metric_families(body)
               for sample in family.samples if sample.name == name)


def quantile(buckets: dict[float, float], q: float) -> float | None:
    """The q-quantile of cumulative histogram buckets, interpolated linearly within the
    bucket it falls in (as Prometheus' histogram_quantile)."""
    bounds = sorted(buckets)
    total = buckets[bounds[-1]]
    if total <= 0:
        return None
    rank, lower, below = q * total, 0.0, 0.0
    for bound in bounds:
        count = buckets[bound]
        if count >= rank:
            if bound == float("inf"):
                return lower
            return lower + (bound - lower) * (rank - below) / max(count - below, 1e-9)
        lower, below = bound, count
    return lower


def _delta(after: dict[float, float], before: dict[float, float]) -> dict[float, float]:
    return {le: v - before.get(le, 0.0) for le, v in after.items()}


class PipelineProcesses:
    """The API, the relay and the four projectors as child processes of isolated settings."""

    def __init__(self, settings: AppSettings, ocr_concurrency: int | None = None,
                 fetch_wait_ms: int | None = None) -> None:
        self._api_port = _free_port()
        self.api = f"http://127.0.0.1:{self._api_port}"
        self.metrics = {name: _free_port() for name in ("relay", *PROJECTORS)}
        env = {**os.environ, **settings_env(settings)}
        if ocr_concurrency is not None:
            env["OUTBOX_OCR_CONCURRENCY"] = str(ocr_concurrency)
        if fetch_wait_ms is not None:
            env["OUTBOX_PROJECTOR_FETCH_WAIT_MAX_MS"] = str(fetch_wait_ms)
        self._procs = Processes(ROOT / ".outbox" / "bench", env)

    def __enter__(self) -> PipelineProcesses:
        try:
            start_pipeline(self._procs, self._api_port, self.metrics)
        except BaseException:
            self._procs.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._procs.stop()

    def settle(self, engine: Engine, timeout_s: float = 60) -> None:
        """Until every projector has applied every event of the outbox (each reads them all),
        so no event of one phase is counted in the next."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with engine.connect() as conn:
                events = conn.execute(text("select count(*) from outbox")).scalar_one()
            applied = [_counter(f"http://127.0.0.1:{self.metrics[n]}/metrics",
                                "outbox_projector_events_applied_total") for n in PROJECTORS]
            if all(a >= events for a in applied):
                return
            time.sleep(0.2)
        raise RuntimeError("the projectors did not apply every event")

    def pickup_histograms(self) -> dict[str, dict[float, float]]:
        """Each projector's pickup histogram, and the relay's commit-to-ack histogram."""
        out = {}
        for name in PROJECTORS:
            got = _histograms(f"http://127.0.0.1:{self.metrics[name]}/metrics",
                              "outbox_projector_pickup_seconds")
            out[name] = got.get(f"projector={name}", {})
        out["relay"] = _histograms(f"http://127.0.0.1:{self.metrics['relay']}/metrics",
                                   "outbox_relay_publish_latency_seconds").get("", {})
        return out


def _burst(api: str, images: list[bytes], tag: str) -> list[Upload]:
    with ThreadPoolExecutor(4) as pool:
        return list(pool.map(
            lambda ib: submit(api, f"{tag} {ib[0]}", [], metadata_first=True,
                              auth=AUTH_A, body=ib[1]), enumerate(images)))


def _steady(api: str, images: list[bytes], every_s: float, watch: SearchableWatch
            ) -> list[Upload]:
    uploads: list[Upload] = []
    start = time.monotonic()
    for i, body in enumerate(images):
        while time.monotonic() < start + i * every_s:  # watching the ones before meanwhile
            watch.check(uploads)
            time.sleep(0.05)
        uploads.append(submit(api, f"steady {i}", [], metadata_first=True,
                              auth=AUTH_A, body=body))
    watch.wait(uploads, timeout_s=120)
    return uploads


def pipeline(burst: int, steady: int, every_s: float = 2.0,
             fetch_wait_ms: int | None = None) -> dict[str, Any]:
    """The burst, then the steady low rate, through the processes; hop latencies of the
    steady phase."""
    tag = uuid.uuid4().hex[:6]
    with isolated_settings("bpipe") as s, PipelineProcesses(s, None, fetch_wait_ms) as procs:
        engine = make_engine(s)
        watch = SearchableWatch(s, engine)
        try:
            images = bodies(burst, f"b{tag}")
            uploads = _burst(procs.api, images, "burst")
            watch.wait(uploads, timeout_s=60 + 10 * burst)
            stage_times(s, uploads)
            burst_figures = _phase_figures(uploads)
            print(f"burst: {burst_figures}", flush=True)
            procs.settle(engine)
            before = procs.pickup_histograms()
            calm = _steady(procs.api, bodies(steady, f"s{tag}"), every_s, watch)
            procs.settle(engine)
            after = procs.pickup_histograms()
            stage_times(s, calm)
            steady_figures = {**_phase_figures(calm), "one_image_every_s": every_s}
            print(f"steady: {steady_figures}", flush=True)
        finally:
            watch.close()
            engine.dispose()
    hops = {}
    for name, hist in after.items():
        d = _delta(hist, before.get(name, {}))
        p50, p99 = quantile(d, 0.5), quantile(d, 0.99)
        hops[name] = {"events": int(d.get(float("inf"), 0)),
                      "p50_ms": None if p50 is None else round(p50 * 1000, 1),
                      "p99_ms": None if p99 is None else round(p99 * 1000, 1)}
    return {"burst": burst_figures, "steady": steady_figures, "hops": hops}


def concurrency_speedup(count: int, rounds: int) -> dict[str, Any]:
    """A burst of `count` images with one OCR recognition at a time against the default
    concurrency, pair by pair: seconds from the first upload to the last searchable."""
    default = AppSettings().ocr_concurrency
    seconds: dict[int, list[float]] = {1: [], default: []}
    for r in range(rounds):
        for c in ((1, default) if r % 2 == 0 else (default, 1)):
            with isolated_settings("bconc") as s, PipelineProcesses(s, c) as procs:
                engine = make_engine(s)
                watch = SearchableWatch(s, engine)
                try:
                    uploads = _burst(procs.api, bodies(count, f"c{c}{uuid.uuid4().hex[:6]}"),
                                     "burst")
                    watch.wait(uploads, timeout_s=60 + 10 * count)
                finally:
                    watch.close()
                    engine.dispose()
            seconds[c].append(max(u.searchable_at for u in uploads)
                              - min(u.submitted for u in uploads))
    speedups = [a / b for a, b in zip(seconds[1], seconds[default], strict=True)]
    return {"images": count, "rounds": rounds, "default_concurrency": default,
            "seconds_one_at_a_time": _spread(seconds[1], 2)["median"],
            "seconds_default": _spread(seconds[default], 2)["median"],
            "speedup": _spread(speedups, 2)["median"],
            "speedup_spread": _spread(speedups, 2)["spread"]}


# --- the run -------------------------------------------------------------------------

def render_markdown(r: dict[str, Any]) -> str:
    """A readable summary of one run."""
    o, p = r["outbox_overhead"], r["pipeline"]
    m, fi = o["message"], o["function_vs_insert"]
    lines = ["# Pipeline benchmark", "",
             f"Machine: {r['machine']['cpus']} CPUs, Python {r['machine']['python']}.", "",
             f"## Outbox overhead ({o['clients']} clients, {o['rounds']} pairs of "
             f"{o['seconds_per_run']} s runs)", "",
             "| transactions | per s (median) |", "|---|---|",
             f"| update one row | {o['tx_per_s_without']:,} |",
             f"| update one row + `emit` (table mode) | {o['tx_per_s_with_emit']:,} |",
             f"| update one row + `emit` (message mode) | {m['tx_per_s_with_emit']:,} |",
             f"| update one row + its own outbox INSERT | {fi['tx_per_s_insert']:,} |", "",
             "Ratios against no event, pair by pair: table mode "
             f"**{o['ratio']}** (spread {o['ratio_spread'][0]}-{o['ratio_spread'][1]}), "
             f"message mode **{m['ratio']}** (spread {m['ratio_spread'][0]}-"
             f"{m['ratio_spread'][1]}). `emit` through `outbox_emit` against its own INSERT: "
             f"{fi['ratio']} (spread {fi['ratio_spread'][0]}-{fi['ratio_spread'][1]}).", "",
             "## Upload to searchable", "",
             "| phase | images | images/s | p50 s | p95 s | max s | upload+confirm | queue->OCR "
             "| OCR | ->embedded | ->searchable |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for phase, label in (("burst", "burst"), ("steady", "one every 2 s")):
        f = p[phase]
        st = f["stages"]
        lines.append(f"| {label} | {f['images']} | {f['images_per_s']} | {f['p50_s']} | "
                     f"{f['p95_s']} | {f['max_s']} | {st['upload_confirm_s']} | "
                     f"{st['queue_to_ocr_s']} | {st['ocr_s']} | {st['to_embedded_s']} | "
                     f"{st['to_searchable_s']} |")
    c = p["concurrency"]
    lines += ["", f"A burst of {c['images']} images, one OCR recognition at a time against the "
              f"default ({c['default_concurrency']}), {c['rounds']} pairs: "
              f"{c['seconds_one_at_a_time']} s against {c['seconds_default']} s, "
              f"**{c['speedup']}x** (spread {c['speedup_spread'][0]}-"
              f"{c['speedup_spread'][1]})."]
    fast = r["hop_latency_fast_fetch"]
    lines += ["", "Stage columns are medians in seconds. At the steady rate, p50 against the "
              f"OCR time + 1 s: {p['steady']['p50_s']} s against "
              f"{round(p['steady']['stages']['ocr_s'] + 1, 3)} s.", "",
              "## Hop latency (steady phase)", "",
              f"Projectors at the default `fetch.wait.max.ms` (500), and a second pipeline at "
              f"{fast['fetch_wait_max_ms']} ms (its steady p50 to searchable: "
              f"{fast['steady']['p50_s']} s).", "",
              "| hop | events | p50 ms | p99 ms | p50 ms, fetch wait "
              f"{fast['fetch_wait_max_ms']} ms | p99 ms |", "|---|---|---|---|---|---|"]
    names = {"relay": "commit -> acknowledged by the broker (relay)"}
    for hop, h in p["hops"].items():
        label = names.get(hop, f"commit -> {hop} projector starts applying")
        f = fast["hops"][hop]
        lines.append(f"| {label} | {h['events']} | {h['p50_ms']} | {h['p99_ms']} | "
                     f"{f['p50_ms']} | {f['p99_ms']} |")
    lines += ["", "Hop quantiles are interpolated within histogram buckets (5, 10, 20, 30, "
              "40, 50, 75, 100, 150, 200, 300 ms, ...).", ""]
    return "\n".join(lines)


def run(burst: int, steady: int, rounds: int, seconds: float, name: str) -> dict[str, Any]:
    """Every case; the results written to bench/results/<name>.{json,md}."""
    result: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "outbox_overhead": outbox_overhead(rounds, seconds)}
    print(f"outbox_overhead: {result['outbox_overhead']}", flush=True)
    result["pipeline"] = pipeline(burst, steady)
    result["pipeline"]["concurrency"] = concurrency_speedup(24 if burst >= 24 else burst,
                                                            rounds=2 if burst >= 24 else 1)
    print(f"concurrency: {result['pipeline']['concurrency']}", flush=True)
    result["hop_latency"] = result["pipeline"]["hops"]
    # The same steady phase with consumers that ask the broker for new messages every 50 ms
    # (Tansu answers a waiting fetch late; see docs/operating/projectors.md).
    fast = pipeline(min(burst, 6), steady, fetch_wait_ms=FAST_FETCH_WAIT_MS)
    result["hop_latency_fast_fetch"] = {"fetch_wait_max_ms": FAST_FETCH_WAIT_MS,
                                        "steady": fast["steady"], "hops": fast["hops"]}
    print(f"fast fetch: {result['hop_latency_fast_fetch']}", flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    md = render_markdown(result)
    (RESULTS / f"{name}.md").write_text(md)
    print(md)
    return result


def main() -> None:
    """Command-line entry point."""
    bench_main(__doc__, full=lambda: run(200, 30, rounds=5, seconds=5, name="pipeline"),
               quick=lambda: run(6, 3, rounds=1, seconds=1, name="quick.pipeline"))


if __name__ == "__main__":
    main()
