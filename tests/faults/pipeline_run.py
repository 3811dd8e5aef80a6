"""A whole pipeline for one fault scenario: the API in process, the relay and the projectors
on threads (or a projector as a process), its own schema, topics, index, keys and bucket;
and the outcome once the fault is over."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import redis
from elasticsearch import Elasticsearch
from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.engine import Engine

from outbox.db import make_engine
from outbox.kafka import topic_name
from outbox_app.api.app import create_app
from outbox_app.audit import Auditor, Repairer
from outbox_app.sample_images import text_image
from outbox_app.settings import AppSettings
from outbox_images.policy import ImageState
from outbox_images.storage import s3_client
from outbox_images.tables import image_table
from tests.auth import AUTH_A
from tests.db_roles import as_app
from tests.faults.dead_letters import dead_letters
from tests.faults.load import committed_ids
from tests.faults.report import Outcome, scale
from tests.images import upload
from tests.pipeline_harness import PROJECTOR_NAMES, Pipeline, isolated_settings
from tests.relay_harness import read_topic

S = ImageState
FAILED = {S.OCR_FAILED, S.EMBEDDING_FAILED, S.REJECTED}


@dataclass
class PipelineRun:
    settings: AppSettings
    pipeline: Pipeline
    api: TestClient
    engine: Engine

    def submit(self, count: int) -> list[str]:
        """`count` images, English and Chinese in turn, uploaded, confirmed, with metadata
        (each goes straight to OCR)."""
        ids = []
        for i in range(count):
            n = uuid.uuid4().hex[:4]
            lines = ([f"Invoice {n}", "Total 12.50"] if i % 2 == 0 else
                     [f"发票 {n}", "合计 12.50"])
            ids.append(self.submit_image(text_image(lines), lines[0]))
        return ids

    def submit_image(self, body: bytes, title: str) -> str:
        """One PNG image uploaded, confirmed, with metadata; its id."""
        n = uuid.uuid4().hex[:4]
        created = self.api.post("/v1/images", headers=AUTH_A, json={
            "filename": f"{n}.png", "content_type": "image/png", "size": len(body),
            "metadata": {"title": title}}).json()
        assert upload(created, body).status_code in (200, 204)
        confirmed = self.api.post(f"/v1/images/{created['id']}/uploaded", headers=AUTH_A)
        assert confirmed.status_code == 200, confirmed.text
        return created["id"]

    def states(self, ids: list[str]) -> dict[str, tuple[str, int]]:
        """Each image's state and version in the database."""
        t = image_table.c
        with self.engine.connect() as conn:
            rows = conn.execute(select(t.id, t.state, t.version).where(
                t.id.in_([uuid.UUID(i) for i in ids]))).all()
        return {str(r.id): (r.state, r.version) for r in rows}

    def searchable(self, ids: list[str]) -> int:
        """How many of `ids` the API reports searchable (both views at the row's version)."""
        return sum(self.api.get(f"/v1/images/{i}", headers=AUTH_A).json().get("searchable")
                   is True for i in ids)

    def count_in(self, ids: list[str], *states: str) -> int:
        return sum(s in states for s, _ in self.states(ids).values())

    def outcome(self, scenario: str, fault: str, ids: list[str], fault_end: float, *,
                repair: bool = False, expected_dead_letters: int = 0) -> Outcome:
        """Wait until every image is settled and the audit is clean (running the repair
        through the log first when `repair`, as an operator would), then count."""
        es = Elasticsearch(self.settings.es_url)
        client = redis.Redis.from_url(self.settings.redis_url)
        s3 = s3_client(self.settings)
        auditor = Auditor(self.settings, self.engine, es, client, s3, grace_s=0)
        findings: list = []
        deadline = time.monotonic() + scale(300, 150)
        repaired, next_repair = 0, 0.0
        while time.monotonic() < deadline:
            states = self.states(ids)
            if all(s in (S.EMBEDDED, *FAILED) for s, _ in states.values()):
                findings = list(auditor.findings())
                if not findings:
                    break
                if repair and time.monotonic() >= next_repair:
                    for f in findings:
                        Repairer(self.settings, self.engine, s3).repair(f)
                    repaired += len(findings)
                    # Its events take a moment through the relay and the projectors.
                    next_repair = time.monotonic() + 15
            time.sleep(1)
        recover_s = time.monotonic() - fault_end
        committed = committed_ids(self.engine)
        got = read_topic(self.settings.kafka_bootstrap,
                         topic_name(self.settings.topic_prefix, "image"), committed, 60)
        docs = es.mget(index=self.settings.es_index, ids=ids)["docs"]
        versions = {d["_id"]: d["_source"]["version"] for d in docs if d.get("found")}
        states = self.states(ids)
        unsettled = {i: s for i, (s, _) in states.items() if s not in (S.EMBEDDED, *FAILED)}
        out = Outcome(scenario, fault, committed=len(committed),
                      in_kafka=len(committed & got.ids.keys()), duplicates=got.duplicates,
                      dead_letters=dead_letters(self.settings), recover_s=recover_s,
                      docs_right=sum(versions.get(i) == v for i, (_, v) in states.items()),
                      docs_total=len(ids),
                      failed_images=sum(s in FAILED for s, _ in states.values()),
                      audit_findings=len(findings),
                      expected_dead_letters=expected_dead_letters)
        if unsettled:
            out.violations.append(f"{len(unsettled)} images never finished: {unsettled}")
        if repair:
            out.notes.append(f"healed through the log by `outbox audit --repair` "
                             f"({repaired} findings repaired)")
        es.close()
        client.close()
        return out


@contextmanager
def pipeline_run(tag: str, *, threads: tuple[str, ...] = PROJECTOR_NAMES,
                 overrides: dict[str, AppSettings] | None = None) -> Iterator[PipelineRun]:
    """The relay and the projectors in `threads` running on their own resources;
    `overrides`: projector name -> the settings it runs with (a proxy in front of a store)."""
    with isolated_settings(tag) as settings:
        p = Pipeline(settings)
        engine = make_engine(settings)
        try:
            p.start_relay()
            for name in threads:
                p.start_projector(name, settings=(overrides or {}).get(name))
            with TestClient(create_app(as_app(settings)), raise_server_exceptions=False) as api:
                yield PipelineRun(settings, p, api, engine)
        finally:
            p.stop()
            engine.dispose()
