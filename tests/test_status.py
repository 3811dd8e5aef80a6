"""`outbox status` and the status page against the real stack: a pipeline (relay and the four
projectors on threads) takes images through, the API is served by uvicorn, the command runs
as a process and the page in a headless Chromium (Debian's, driven by Playwright)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import uvicorn
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from outbox.db import make_engine
from outbox.kafka import dlq_topic, topic_name
from outbox.tables import outbox_table
from outbox_app.api.app import create_app
from outbox_app.log_positions import ThroughputMeter, group_backlogs
from projectors.dead_letters import replay
from tests.auth import AUTH_A, AUTH_B
from tests.images import undecodable_png
from tests.pipeline_harness import PROJECTOR_NAMES, cache_at, isolated_settings, wait_for
from tests.relay_harness import ROOT, free_port, settings_env
from tests.test_pipeline import submit

pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"
SCREENSHOT = ROOT / "docs" / "status-page.png"
TITLES = {"Harbour Cafe receipt": ["Harbour Cafe receipt", "Total 12.50 USD"],
          "Mountain hut invoice": ["Mountain hut invoice", "Two nights 180.00 EUR"]}


@pytest.fixture(scope="module")
def cfg():
    with isolated_settings("status") as s:
        yield s


@pytest.fixture(scope="module")
def server(cfg) -> Iterator[str]:
    """The API served by uvicorn on a free port of 127.0.0.1, on a thread of this process."""
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(create_app(cfg), host="127.0.0.1", port=port,
                                        log_config=None, timeout_graceful_shutdown=5))
    thread = threading.Thread(target=srv.run, daemon=True, name="status-api")
    thread.start()
    wait_for(lambda: srv.started, timeout_s=20, interval_s=0.05, what="uvicorn started")
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(10)


@pytest.fixture(scope="module")
def api(server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server, timeout=30) as client:
        yield client


@pytest.fixture(scope="module")
def embedded(cfg, pipeline, api) -> dict[str, str]:
    """Two images of org A through the pipeline: embedded, searchable and cached."""
    ids = {title: submit(api, lines, title) for title, lines in TITLES.items()}
    for image_id in ids.values():
        doc = wait_for(lambda i=image_id: (d := api.get(f"/v1/images/{i}", headers=AUTH_A)
                                           .json())["searchable"] and d, what="searchable")
        wait_for(lambda i=image_id, v=doc["version"]: cache_at(cfg, i, v), what="cached")
    return ids


def status(api, auth: dict[str, str] = AUTH_A) -> dict:
    r = api.get("/v1/status", headers=auth)
    assert r.status_code == 200, r.text
    return r.json()


def caught_up(api, names=PROJECTOR_NAMES) -> dict | None:
    s = status(api)
    return s if all(p["behind"] == 0 for p in s["projectors"] if p["name"] in names) else None


def cli(cfg, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "outbox.cli", "status", *args],
                          env={**os.environ, **settings_env(cfg), "COLUMNS": "200", **env},
                          capture_output=True, text=True, timeout=120)


def count_of(report: dict, state: str) -> int:
    return next(i["count"] for i in report["images"] if i["state"] == state)


def test_a_pipeline_that_went_through_is_healthy(cfg, api, embedded):
    wait_for(lambda: caught_up(api), what="every projector at the end of the log")
    engine = make_engine(cfg)
    with engine.connect() as conn:
        events = conn.execute(select(func.count()).select_from(outbox_table)).scalar_one()
    engine.dispose()
    r = cli(cfg, "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    report = json.loads(r.stdout)
    assert report["healthy"] and report["attention"] == [], report["attention"]
    assert [s["name"] for s in report["services"] if s["ok"]] == [
        "database", "kafka", "search", "redis", "s3"]
    assert count_of(report, "embedded") == 2
    assert report["relay"]["leader"] and report["relay"]["slot"]
    assert report["relay"]["acked_lsn"] and report["relay"]["waiting_events"] == 0
    for p in report["projectors"]:
        # Every event the images made was read by every projector, and nothing is left.
        assert (p["committed"], p["behind"], p["behind_at_least"]) == (events, 0, False), p
        assert p["events_per_s"] == 0.0  # measured over the window: nothing came meanwhile
    assert report["overdue"]["count"] == report["failures"]["count"] == 0

    table = cli(cfg, "--window", "0")
    assert table.returncode == 0, table.stdout + table.stderr
    assert "healthy: nothing needs attention" in table.stdout
    assert "embedded" in table.stdout and "projector" in table.stdout

    # The same pipeline, seen by a status whose Redis address has nothing listening.
    down = cli(cfg, "--json", "--window", "0",
               OUTBOX_REDIS_URL=f"redis://127.0.0.1:{free_port()}/0")
    assert down.returncode == 1, down.stdout + down.stderr
    [line] = json.loads(down.stdout)["attention"]
    assert line.startswith("redis unreachable: ConnectionError"), line


def test_lag_overdue_failed_images_and_dead_letters_need_attention(cfg, pipeline, api,
                                                                   embedded):
    # An image that fails OCR (its bytes do not decode), and one never uploaded whose
    # deadline is one second.
    failed = submit(api, None, "broken scan", body=undecodable_png())
    short = cfg.model_copy(update={"deadline_requested_s": 1})
    with TestClient(create_app(short)) as quick:
        r = quick.post("/v1/images", headers=AUTH_A, json={
            "filename": "late.png", "content_type": "image/png", "size": 100})
        assert r.status_code == 201, r.text
        overdue = r.json()["id"]
    wait_for(lambda: api.get(f"/v1/images/{failed}", headers=AUTH_A).json()["state"]
             == "ocr_failed", what="ocr_failed")
    wait_for(lambda: caught_up(api), what="every projector at the end of the log")

    # The cache projector stops; two messages no projector can decode arrive, one of them
    # naming org A.
    pipeline.stop_projector("cache")
    for t in pipeline.threads:
        if t.name == "projector-cache":
            t.join(30)  # out of the group: what arrives now waits for the next one
    topic = topic_name(cfg.topic_prefix, "image")
    producer = Producer({"bootstrap.servers": cfg.kafka_bootstrap})
    producer.produce(topic, key=b"poison", value=b"\xff not json")
    producer.produce(topic, key=b"poison-a", value=json.dumps(
        {"id": "nope", "org_id": "org-a"}).encode())
    assert producer.flush(10) == 0
    wait_for(lambda: caught_up(api, ("ocr", "embed", "search")), what="the others past them")
    lagging = cli(cfg, "--json", "--max-lag-s", "0", "--window", "0")
    assert lagging.returncode == 1, lagging.stdout + lagging.stderr
    cache = next(p for p in json.loads(lagging.stdout)["projectors"] if p["name"] == "cache")
    assert (cache["behind"], cache["behind_at_least"]) == (2, False), cache
    assert cache["oldest_waiting_s"] is not None
    assert any(line.startswith("projector cache: 2 events behind")
               for line in json.loads(lagging.stdout)["attention"])

    pipeline.start_projector("cache")
    wait_for(lambda: caught_up(api), what="the cache projector caught up")
    r = cli(cfg, "--json", "--window", "0")
    assert r.returncode == 1, r.stdout + r.stderr
    report = json.loads(r.stdout)
    assert [(o["id"], o["state"]) for o in report["overdue"]["items"]] == [
        (overdue, "requested")]
    assert report["overdue"]["items"][0]["deadline_at"] and report["overdue"]["by_state"] == {
        "requested": 1}
    [failure] = report["failures"]["items"]
    assert failure["id"] == failed and "cannot decode image" in failure["error"]
    letters = {d["topic"]: (d["letters"], d["not_replayed"]) for d in report["dead_letters"]}
    assert letters == {dlq_topic(topic, n): (2, 2) for n in PROJECTOR_NAMES}
    assert len(report["attention"]) == 2 + len(PROJECTOR_NAMES), report["attention"]
    assert all(p["oldest_waiting_s"] is None for p in report["projectors"])

    # Org A's: one letter per topic, the one naming it (the undecodable one names no org).
    assert {d["letters"] for d in status(api)["dead_letters"]} == {1}
    table = cli(cfg, "--window", "0", "--org", "org-a")
    assert table.returncode == 1
    assert "outbox status: org org-a" in table.stdout
    assert overdue in table.stdout and failed in table.stdout
    assert "attention: images past their state deadline: 1 (requested 1)" in table.stdout
    assert f"attention: dead letters not replayed in {dlq_topic(topic, 'ocr')}: 1" in table.stdout

    # Replayed, the OCR projector's letters count as such; back in the source topic they
    # fail again (two new letters in every dead-letter topic, not replayed).
    assert replay(cfg, dlq_topic(topic, "ocr"))["replayed"] == 2
    wait_for(lambda: caught_up(api), what="the replayed messages dead-lettered again")
    report = json.loads(cli(cfg, "--json", "--window", "0").stdout)
    letters = {d["topic"]: (d["letters"], d["not_replayed"]) for d in report["dead_letters"]}
    assert letters == {dlq_topic(topic, n): (4, 2 if n == "ocr" else 4)
                       for n in PROJECTOR_NAMES}


def test_another_org_sees_nothing_of_this_org(api, embedded):
    theirs = status(api, AUTH_B)
    text = json.dumps(theirs)
    assert not any(image_id in text for image_id in embedded.values())
    assert all(i["count"] == 0 for i in theirs["images"])
    assert theirs["overdue"]["items"] == theirs["failures"]["items"] == []
    assert all(d["letters"] == 0 for d in theirs["dead_letters"])
    assert count_of(status(api), "embedded") == 2
    assert api.get("/v1/status").json()["error"]["code"] == "unauthorized"


def test_throughput_is_measured_over_the_last_minute_of_samples():
    meter = ThroughputMeter(window_s=60)
    assert meter.observe("g", 100, now=0.0) is None  # one sample: no rate yet
    assert meter.observe("g", 130, now=10.0) == 3.0
    assert meter.observe("g", 250, now=70.0) == 2.0  # the sample at 0 s left the window
    assert meter.observe("g", 400, now=200.0) is None  # nothing within the last minute
    assert meter.observe("g", 10, now=201.0) is None  # offsets went back (a reset): start over
    assert meter.observe("g", 40, now=211.0) == 3.0


def test_a_backlog_past_the_read_cap_is_a_lower_bound(cfg):
    topic = f"{cfg.topic_prefix}.capped"
    admin = AdminClient({"bootstrap.servers": cfg.kafka_bootstrap})
    admin.create_topics([NewTopic(topic, 1, 1)])[topic].result(30)
    producer = Producer({"bootstrap.servers": cfg.kafka_bootstrap})
    for i in range(30):
        producer.produce(topic, key=str(i).encode(), value=b"{}")
    assert producer.flush(10) == 0
    # Group "far" has read nothing, group "near" all but the last 5: one read from offset 0,
    # cut at 10 messages, cannot reach "near", which gets a read of its own.
    found, _ = group_backlogs(cfg, {"far": {(topic, 0): 0}, "near": {(topic, 0): 25}}, {},
                              {topic: 10}, set())
    assert found["far"][0] == 10 and found["far"][2] is False  # at least 10
    assert found["near"][0] == 5 and found["near"][2] is True  # exactly 5
    assert found["far"][1] <= found["near"][1]  # the oldest waiting: not later for "far"


def test_a_schema_without_tables_cannot_be_told(cfg):
    r = cli(cfg, "--window", "0", OUTBOX_DB_SCHEMA="status_not_migrated")
    assert r.returncode == 2
    assert "could not complete" in r.stderr and "outbox migrate" in r.stderr


def test_the_status_page_in_a_browser(server, embedded):
    from playwright.sync_api import expect, sync_playwright

    assert Path(CHROMIUM).exists(), "apt-get install chromium (the Makefile does)"
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.goto(f"{server}/status")
            page.fill("#key", "not-a-key")
            page.click("#key-form button")
            expect(page.locator("#key-error")).to_contain_text("refused")

            page.fill("#key", "key-a")
            page.click("#key-form button")
            expect(page.locator("#scope")).to_have_text("org org-a")
            embedded_row = page.locator('#images tr[data-state="embedded"] td').nth(1)
            expect(embedded_row).to_have_text("2")
            expect(page.locator("#overdue tbody")).to_contain_text("requested")
            expect(page.locator("#failures tbody")).to_contain_text("cannot decode image")
            expect(page.locator("#badge")).to_have_text("needs attention")
            for name in PROJECTOR_NAMES:
                expect(page.locator(f'#projectors tr[data-projector="{name}"]')).to_be_visible()
            assert "key-a" not in page.url
            assert page.evaluate("sessionStorage.getItem('outbox-api-key')") == "key-a"

            first = page.locator("#updated").inner_text()
            expect(page.locator("#updated")).not_to_have_text(first, timeout=5000)  # refreshed

            page.fill("#q", "harbour receipt")
            page.click("#search-form button")
            hit = page.locator(f'#results li[data-image="{embedded["Harbour Cafe receipt"]}"]')
            expect(hit).to_contain_text("Harbour Cafe receipt")
            if os.environ.get("OUTBOX_WRITE_SCREENSHOT") == "1":
                SCREENSHOT.parent.mkdir(exist_ok=True)
                page.screenshot(path=str(SCREENSHOT), full_page=True)

            page.click("#forget")
            expect(page.locator("#key-panel")).to_be_visible()
            assert page.evaluate("sessionStorage.getItem('outbox-api-key')") is None
        finally:
            browser.close()
