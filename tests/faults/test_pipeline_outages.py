"""Fault scenarios of the whole pipeline: the search server stopped or overloaded, Redis
flushed or restarted, the bucket unreachable during OCR, the OCR projector SIGKILLed
mid-batch, poison messages among good ones. At the end every image is searchable at its
database version, none failed because of the fault, and the audit is clean."""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter
from datetime import UTC, datetime
from urllib.parse import urlparse

import pytest
import redis
from confluent_kafka import Producer

from outbox.envelope import EventEnvelope
from outbox.kafka import topic_name
from outbox_app.reconciler import Reconciler
from outbox_images.storage import s3_client
from tests.faults.pipeline_run import S, pipeline_run
from tests.faults.proxies import CuttableTcpProxy, OverloadedSearchProxy
from tests.faults.report import scale
from tests.ocr_process import OcrProcess, image_row, slow_image
from tests.pipeline_harness import wait_for
from tests.relay_harness import stack

pytestmark = pytest.mark.slow
IMAGES = int(scale(24, 6))


def _flowing(run, ids: list[str]) -> None:
    """Until a first image is searchable: every stage has worked when the fault lands, and
    the views hold a finished image that no later event would write again."""
    wait_for(lambda: run.searchable(ids) > 0, timeout_s=120, what="a first image")


def test_search_server_stopped(record):
    outage = scale(30, 6)
    with pipeline_run("fes") as run:
        ids = run.submit(IMAGES)
        _flowing(run, ids)
        stack("down", "search")
        try:
            time.sleep(outage)
        finally:
            stack("up", "search")
        fault_end = time.monotonic()
        record(run.outcome("search stopped", f"search server stopped {outage:.0f} s while "
                           f"{IMAGES} images go through", ids, fault_end))


def test_search_server_answers_429(record, base_settings):
    refusals = int(scale(6, 2))
    proxy = OverloadedSearchProxy(base_settings.es_url,
                                  ["whole"] * refusals + ["items"] * refusals)
    try:
        with pipeline_run("f429", threads=("ocr", "embed", "cache")) as run:
            run.pipeline.start_projector(
                "search", settings=run.settings.model_copy(update={"es_url": proxy.url}))
            ids = run.submit(IMAGES)
            wait_for(lambda: not proxy.plan, timeout_s=120, what="the refusals")
            fault_end = time.monotonic()
            out = run.outcome("search overloaded", f"{refusals} bulk requests refused with "
                              f"429, then {refusals} with every item refused with 429", ids,
                              fault_end)
            record(out)
    finally:
        proxy.close()


@pytest.mark.parametrize("fault", ["flushed", "restarted"])
def test_redis_flushed_or_restarted(record, fault):
    with pipeline_run("fre") as run:
        ids = run.submit(IMAGES)
        _flowing(run, ids)
        if fault == "flushed":
            redis.Redis.from_url(run.settings.redis_url).flushdb()
        else:
            stack("down", "redis")
            try:
                time.sleep(scale(10, 3))
            finally:
                stack("up", "redis")
        fault_end = time.monotonic()
        record(run.outcome(f"Redis {fault}", f"Redis {fault} while {IMAGES} images go "
                           "through (it keeps no data over a restart)", ids, fault_end,
                           repair=True))


def test_bucket_unreachable_during_ocr(record, base_settings):
    proxy = CuttableTcpProxy(urlparse(base_settings.s3_endpoint).port)
    outage = scale(20, 5)
    try:
        with pipeline_run("fs3", threads=("embed", "search", "cache")) as run:
            run.pipeline.start_projector(
                "ocr", settings=run.settings.model_copy(update={"s3_endpoint": proxy.url}))
            ids = run.submit(IMAGES)
            wait_for(lambda: run.count_in(ids, S.OCR_RUNNING, S.EMBEDDING_PENDING,
                                          S.EMBEDDED) > 0, timeout_s=120, what="OCR running")
            proxy.cut()
            time.sleep(outage)
            proxy.restore()
            fault_end = time.monotonic()
            record(run.outcome("bucket unreachable", f"the OCR worker's bucket unreachable "
                               f"{outage:.0f} s while OCR runs", ids, fault_end))
    finally:
        proxy.close()


def test_ocr_projector_sigkilled_mid_batch(record, tmp_path):
    kills_wanted = int(scale(3, 1))
    with pipeline_run("fkill", threads=("embed", "search", "cache")) as run:
        # An attempt cut by the kill stays `ocr_running` until its deadline; the reconciler
        # then counts a crash (not an attempt) and asks for OCR again, run alone this time.
        deadline = {"deadline_ocr_running_s": 6}
        ocr = OcrProcess(run.settings, tmp_path, OUTBOX_DEADLINE_OCR_RUNNING_S="6")
        reconciler = Reconciler(run.settings.model_copy(update=deadline), run.engine,
                                s3_client(run.settings))
        threading.Thread(target=reconciler.run, args=(1.0,), daemon=True).start()
        try:
            ocr.start()
            # Every kill lands during the recognition of the same image, the slowest, sent
            # first so that the first kill also cuts the images recognised beside it.
            target = run.submit_image(slow_image(), "a long receipt")
            ids = [target, *run.submit(IMAGES - 1)]
            kills = mid_ocr = 0
            while kills < kills_wanted:
                ocr.kill_during(target)
                kills += 1
                mid_ocr += image_row(run.engine, target)["state"] == S.OCR_RUNNING
                ocr.start()
            fault_end = time.monotonic()
            out = run.outcome("OCR projector SIGKILLed", f"OCR process SIGKILLed {kills}×, "
                              f"{mid_ocr}× during the recognition of the same image", ids,
                              fault_end)
        finally:
            reconciler.stop.set()
            ocr.stop()
        if mid_ocr != kills:
            out.violations.append(f"{kills - mid_ocr} kills missed the chosen image's "
                                  "recognition")
        hit = image_row(run.engine, target)
        if hit["crashes"] < kills or hit["attempts"] != 1:
            out.violations.append(f"the killed image counts {hit['crashes']} crashes and "
                                  f"{hit['attempts']} attempts after {kills} kills")
        out.notes.append(f"the image killed {kills}× ends {hit['state']} with "
                         f"{hit['crashes']} crashes and {hit['attempts']} attempt charged")
        per_attempt = Counter((e["image"], e["attempt"], e["crashes"])
                              for e in ocr.events("ocr_engine_run"))
        twice = {k: n for k, n in per_attempt.items() if n > 1}
        if twice:
            out.violations.append(f"OCR ran twice for the same attempt: {twice}")
        else:
            out.notes.append(f"{sum(per_attempt.values())} OCR runs for {len(ids)} images, "
                             "none twice for the same attempt")
        record(out)


def _poison(i: int) -> bytes:
    kinds = [b"\xff\xfe not json",
             b'{"id": "not-a-uuid", "type": 7}',
             EventEnvelope(id=uuid.uuid4(), type="image.ocr_requested", aggregate_type="image",
                           aggregate_id=str(uuid.uuid4()), aggregate_version=1,
                           occurred_at=datetime.now(UTC), payload={}).to_json()
             .replace(b'"schema":1', b'"schema":99')]
    return kinds[i % len(kinds)]


def test_poison_messages_among_good_ones(record):
    with pipeline_run("fpo") as run:
        topic = topic_name(run.settings.topic_prefix, "image")
        producer = Producer({"bootstrap.servers": run.settings.kafka_bootstrap})
        ids: list[str] = []
        for i in range(IMAGES):
            ids += run.submit(1)
            producer.produce(topic, key=str(uuid.uuid4()).encode(), value=_poison(i))
        assert producer.flush(30) == 0
        fault_end = time.monotonic()
        consumers = sum(topic in rt.topics for rt in run.pipeline.runtimes.values())
        record(run.outcome("poison messages", f"{IMAGES} undecodable or foreign-schema "
                           f"messages among {IMAGES} images", ids, fault_end,
                           expected_dead_letters=IMAGES * consumers))


@pytest.mark.parametrize("fault", ["document deleted", "Redis flushed", "live index deleted"])
def test_lost_views_heal_themselves(record, fault):
    """Healed by the reconciler alone (its view healing and continuous audit, every round of
    1 s, an audit pass every 5 s): no `outbox audit --repair` typed. `recover` is the time
    to heal."""
    from elasticsearch import Elasticsearch

    from outbox_app.reconciler_checks import round_checks
    from outbox_app.views.search_index import aliased_indices
    from tests.pipeline_harness import metric

    with pipeline_run("fheal") as run:
        settings = run.settings.model_copy(update={"reconciler_audit_interval_s": 5.0,
                                                   "reconciler_audit_grace_s": 1.0})
        reconciler = Reconciler(settings, run.engine, s3_client(settings))
        reconciler.checks = round_checks(settings, run.engine, s3_client(settings),
                                         stop=reconciler.stop)
        thread = threading.Thread(target=reconciler.run, args=(1.0,))
        thread.start()
        es, client = Elasticsearch(settings.es_url), redis.Redis.from_url(settings.redis_url)
        try:
            # The reconciler's first round has seen the views born (its marker in Redis).
            marker = f"{settings.redis_prefix}:task-cache-marker"
            wait_for(lambda: client.exists(marker), timeout_s=30, what="the first round")
            ids = run.submit(IMAGES)
            _flowing(run, ids)
            if fault == "document deleted":
                held = es.mget(index=settings.es_index, ids=ids)["docs"]
                es.delete(index=settings.es_index, id=next(d["_id"] for d in held
                                                           if d.get("found")), refresh=True)
            elif fault == "Redis flushed":
                # This run's keys, the marker among them: the shared server keeps the others'.
                for key in client.scan_iter(f"{settings.redis_prefix}:*"):
                    client.delete(key)
            else:
                es.indices.delete(index=aliased_indices(es, settings.es_index))
            fault_end = time.monotonic()
            # The views back first: the audit below cannot read a view without its alias,
            # and a cache without its marker is not healed yet.
            wait_for(lambda: aliased_indices(es, settings.es_index), timeout_s=120,
                     what="the alias back")
            wait_for(lambda: client.exists(marker), timeout_s=120, what="the cache back")
            out = run.outcome(f"{fault}, healed alone", f"{fault} while {IMAGES} images go "
                              "through; the reconciler heals it", ids, fault_end)
            wait_for(lambda: sum(metric("outbox_view_rebuild_in_progress", view=v)
                                 for v in ("search", "cache")) == 0,
                     timeout_s=120, what="the rebuild finished")
        finally:
            reconciler.stop.set()
            thread.join(120)
            es.close()
            client.close()
        out.notes.append(f"healed by the reconciler with nothing typed in {out.recover_s:.1f} "
                         "s (view healing every 1 s round, an audit pass every 5 s)")
        record(out)
