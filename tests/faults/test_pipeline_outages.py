"""Fault scenarios of the whole pipeline: the search server stopped or overloaded, Redis
flushed or restarted, the bucket unreachable during OCR, the OCR projector SIGKILLed
mid-batch, poison messages among good ones. At the end every image is searchable at its
database version, none failed because of the fault, and the audit is clean."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from datetime import UTC, datetime
from urllib.parse import urlparse

import pytest
import redis
from confluent_kafka import Producer

from app.reconciler import Reconciler
from images.storage import s3_client
from outbox.envelope import EventEnvelope
from outbox.kafka import topic_name
from tests.db_roles import APP_URL, role_url
from tests.faults.pipeline_run import S, pipeline_run
from tests.faults.proxies import CuttableTcpProxy, OverloadedSearchProxy
from tests.faults.report import scale
from tests.pipeline_harness import wait_for
from tests.relay_harness import ROOT, free_port, settings_env, stack

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


class OcrProcess:
    """`outbox project ocr` as a child process (the application's role), its log in a file
    of its own per start."""

    def __init__(self, settings, log_dir, **env: str) -> None:
        self._env = {**os.environ, **settings_env(settings),
                     "OUTBOX_DATABASE_URL": role_url(APP_URL), **env}
        self._dir = log_dir
        self.logs: list = []
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        path = self._dir / f"ocr-{len(self.logs)}.log"
        self.logs.append(path)
        with open(path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "outbox.cli", "project", "ocr", "--metrics-port",
                 str(free_port())], env=self._env, cwd=ROOT, stdout=log,
                stderr=subprocess.STDOUT)

    def events(self, name: str) -> list[dict]:
        out = []
        for path in self.logs:
            for line in path.read_text(errors="replace").splitlines():
                if f'"{name}"' in line and line.startswith("{"):
                    out.append(json.loads(line))
        return out

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(30)


def test_ocr_projector_sigkilled_mid_batch(record, tmp_path):
    kills_wanted = int(scale(3, 1))
    with pipeline_run("fkill", threads=("embed", "search", "cache")) as run:
        # An attempt cut by the kill stays `ocr_running` until its deadline; the reconciler
        # then gives the image another attempt.
        deadline = {"deadline_ocr_running_s": 6}
        ocr = OcrProcess(run.settings, tmp_path, OUTBOX_DEADLINE_OCR_RUNNING_S="6")
        reconciler = Reconciler(run.settings.model_copy(update=deadline), run.engine,
                                s3_client(run.settings))
        threading.Thread(target=reconciler.run, args=(1.0,), daemon=True).start()
        try:
            ocr.start()
            ids = run.submit(IMAGES)
            kills = mid_ocr = 0
            while kills < kills_wanted:
                runs = len(ocr.events("ocr_engine_run"))
                wait_for(lambda runs=runs: len(ocr.events("ocr_engine_run")) > runs,
                         timeout_s=120, interval_s=0.02, what="an OCR run to kill")
                ocr.proc.send_signal(signal.SIGKILL)
                ocr.proc.wait(10)
                kills += 1
                mid_ocr += len(ocr.events("ocr_engine_run")) > len(ocr.events("ocr_done"))
                ocr.start()
            fault_end = time.monotonic()
            out = run.outcome("OCR projector SIGKILLed", f"OCR process SIGKILLed {kills}×, "
                              f"{mid_ocr}× during a recognition", ids,
                              fault_end)
        finally:
            reconciler.stop.set()
            ocr.stop()
        per_attempt = Counter((e["image"], e["attempt"]) for e in ocr.events("ocr_engine_run"))
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
