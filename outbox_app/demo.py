"""`outbox demo`: the whole pipeline on the local stack, end to end.

Starts the API, the relay, the four projectors and the reconciler as separate processes
(the relay as the relay's database role, the others as the application's),
uploads a few dozen generated English and Chinese images through the HTTP API with real
presigned uploads, waits until every image is searchable, runs text, vector and Chinese
queries, and prints the time each image spent in each stage. The processes are stopped at
the end (SIGTERM).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
import requests
from rich.console import Console
from rich.table import Table
from sqlalchemy import make_url, select

from outbox.db import libpq_dsn, make_engine
from outbox.grants import grants_sql
from outbox.migrate import histories, migrate
from outbox.tables import outbox_table
from outbox_app.sample_images import text_image
from outbox_app.settings import AppSettings

API_PORT = 18000
METRICS_PORTS = {"relay": 19464, "ocr": 19465, "embed": 19466, "search": 19467, "cache": 19468,
                 "reconcile": 19469}
DEMO_KEY, DEMO_ORG = "demo-key", "demo-org"
# The process roles' URLs `make up` writes into .outbox/env
# (docs/deploying/database-roles.md): the relay runs as the relay's, every other process
# as the application's.
APP_URL, RELAY_URL = "STACK_APP_DATABASE_URL", "STACK_RELAY_DATABASE_URL"

# Twelve English and twelve Chinese documents: a title and the lines drawn on the image.
SAMPLES = json.loads((Path(__file__).resolve().parent / "demo_images.json").read_text())
QUERIES = [("harbour cafe", "text"), ("invoice", "text"), ("超市", "text"), ("火车票", "text"),
           ("coffee receipt", "vector"), ("train to york", "vector"), ("购物小票", "vector"),
           ("药", "hybrid"), ("music concert seat", "hybrid")]


@dataclass
class Upload:
    """One demo image on its way through the pipeline, with its stage timestamps."""

    id: str
    title: str
    submitted: float
    searchable_at: float | None = None
    stages: dict[str, float] = field(default_factory=dict)


class Processes:
    """The demo's child processes, each with a PID file and a log under .outbox/;
    `overrides`: per child name, variables that differ from `env` (its role's URL)."""

    def __init__(self, state_dir: Path, env: dict[str, str],
                 overrides: dict[str, dict[str, str]] | None = None) -> None:
        self.run_dir = state_dir / "run"
        self.log_dir = state_dir / "logs"
        self.env = env
        self.overrides = overrides or {}
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, name: str, args: list[str]) -> None:
        """Start `outbox <args>` as child `name`, logging to its file."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_dir / f"demo-{name}.log", "ab")  # noqa: SIM115 - owned by the child
        env = {**self.env, **self.overrides.get(name, {})}
        proc = subprocess.Popen([sys.executable, "-m", "outbox.cli", *args], env=env,
                                stdout=log, stderr=subprocess.STDOUT)
        (self.run_dir / f"demo-{name}.pid").write_text(f"{proc.pid}\n")
        self.procs[name] = proc

    def stop(self) -> None:
        """SIGTERM every child, wait for it, SIGKILL what does not exit in time."""
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for name, proc in self.procs.items():
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
            (self.run_dir / f"demo-{name}.pid").unlink(missing_ok=True)


def _wait_http(url: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if requests.get(url, timeout=1).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not become ready")


def _wait_assigned(port: int, timeout_s: float = 60) -> None:
    """Until the projector on `port` holds partitions: its group has formed."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if requests.get(f"http://127.0.0.1:{port}/healthz",
                            timeout=1).json().get("assigned_partitions"):
                return
        except requests.RequestException:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"the projector on port {port} got no partitions")


def start_pipeline(procs: Processes, api_port: int, metrics_ports: dict[str, int]) -> None:
    """Start the API on `api_port` and each process of `metrics_ports` (`relay`,
    `reconcile`, or a projector's name) with its metrics port; return once every one is
    ready and every projector holds its partitions, so what follows measures the pipeline
    rather than the consumer groups forming."""
    procs.start("api", ["api", "--port", str(api_port)])
    for name, port in metrics_ports.items():
        command = [name] if name in ("relay", "reconcile") else ["project", name]
        procs.start(name, [*command, "--metrics-port", str(port)])
    _wait_http(f"http://127.0.0.1:{api_port}/readyz")
    for port in metrics_ports.values():
        _wait_http(f"http://127.0.0.1:{port}/readyz")
    for name, port in metrics_ports.items():
        if name not in ("relay", "reconcile"):
            _wait_assigned(port)


def submit(api: str, title: str, lines: list[str], metadata_first: bool,
           auth: dict[str, str] | None = None, body: bytes | None = None) -> Upload:
    """One image through the HTTP API as a client does it: create, presigned upload,
    confirm, and its metadata before or after the upload."""
    auth = auth or {"Authorization": f"Bearer {DEMO_KEY}"}
    body = body if body is not None else text_image(lines)
    start = time.time()
    created = requests.post(f"{api}/v1/images", headers=auth, timeout=30, json={
        "filename": "scan.png", "content_type": "image/png", "size": len(body)}).json()
    meta = {"title": title, "tags": ["demo"]}
    if metadata_first:
        requests.put(f"{api}/v1/images/{created['id']}/metadata", json=meta, headers=auth,
                     timeout=30).raise_for_status()
    requests.post(created["upload_url"], data=created["upload_fields"],
                  files={"file": ("scan.png", body)}, timeout=30).raise_for_status()
    requests.post(f"{api}/v1/images/{created['id']}/uploaded", headers=auth,
                  timeout=30).raise_for_status()
    if not metadata_first:
        requests.put(f"{api}/v1/images/{created['id']}/metadata", json=meta, headers=auth,
                     timeout=30).raise_for_status()
    return Upload(created["id"], title, start)


def stage_times(settings: AppSettings, uploads: list[Upload]) -> None:
    """Per image: when each stage's event was written."""
    engine = make_engine(settings)
    ids = [u.id for u in uploads]
    with engine.connect() as conn:
        rows = conn.execute(select(outbox_table.c.aggregate_id, outbox_table.c.type,
                                   outbox_table.c.created_at)
                            .where(outbox_table.c.aggregate_id.in_(ids))).all()
    engine.dispose()
    for u in uploads:
        for agg, typ, at in rows:
            if agg == u.id:
                u.stages.setdefault(typ, at.timestamp())


def grant_roles(settings: AppSettings, app_url: str, relay_url: str) -> None:
    """Apply `outbox grants` for the roles of `app_url` and `relay_url` in the settings'
    schema, as the settings' (the owner's) role."""
    app_role, relay_role = make_url(app_url).username, make_url(relay_url).username
    if not app_role or not relay_role:
        raise ValueError(f"{APP_URL} and {RELAY_URL} must name their roles")
    sql = grants_sql(settings.db_schema, app_role, relay_role, histories())
    with psycopg.connect(libpq_dsn(settings), autocommit=True) as conn:
        conn.execute(sql)


def run_demo(settings: AppSettings, state_dir: Path) -> int:
    """Run the demo; return the exit code."""
    console = Console(width=120)
    api = f"http://127.0.0.1:{API_PORT}"
    missing = [v for v in (APP_URL, RELAY_URL) if not os.environ.get(v)]
    if missing:
        console.print(f"[red]{' and '.join(missing)} not set[/]: the demo runs each process "
                      "as its own database role; `make up` creates them and writes the URLs "
                      "into .outbox/env")
        return 2
    # The owner (OUTBOX_DATABASE_URL) migrates and grants; no process runs as it.
    env = {**os.environ, "OUTBOX_API_KEYS": f"{DEMO_KEY}:{DEMO_ORG}",
           "OUTBOX_DATABASE_URL": os.environ[APP_URL]}
    console.print(f"[bold]migrating[/] schema {settings.db_schema!r}")
    migrate(settings)
    grant_roles(settings, os.environ[APP_URL], os.environ[RELAY_URL])
    procs = Processes(state_dir, env, {"relay": {"OUTBOX_DATABASE_URL": os.environ[RELAY_URL]}})
    # SIGTERM unwinds like Ctrl-C, so the children are stopped rather than orphaned.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        start_pipeline(procs, API_PORT, METRICS_PORTS)
        console.print(f"API {api}, relay and projectors running (logs: {procs.log_dir})")
        samples = SAMPLES["english"] + SAMPLES["chinese"]
        uploads = [submit(api, doc["title"], doc["lines"], metadata_first=i % 2 == 0)
                   for i, doc in enumerate(samples)]
        console.print(f"uploaded {len(uploads)} images; waiting until all are searchable")
        _wait_searchable(api, uploads, timeout_s=600)
        stage_times(settings, uploads)
        _print_stages(console, uploads)
        _print_queries(console, api, {u.id: u.title for u in uploads})
    finally:
        procs.stop()
        console.print("processes stopped; `make down` stops the stack")
    return 0


def _wait_searchable(api: str, uploads: list[Upload], timeout_s: float) -> None:
    auth = {"Authorization": f"Bearer {DEMO_KEY}"}
    deadline = time.monotonic() + timeout_s
    pending = {u.id: u for u in uploads}
    while pending and time.monotonic() < deadline:
        for image_id, u in list(pending.items()):
            doc = requests.get(f"{api}/v1/images/{image_id}", headers=auth, timeout=30).json()
            if doc.get("searchable"):
                u.searchable_at = time.time()
                del pending[image_id]
            elif doc["state"] in ("ocr_failed", "embedding_failed"):
                raise RuntimeError(f"{image_id} failed: {doc.get('last_error')}")
        time.sleep(0.25)
    if pending:
        raise RuntimeError(f"{len(pending)} images not searchable after {timeout_s}s")


def _print_stages(console: Console, uploads: list[Upload]) -> None:
    table = Table(title="Time per stage (seconds)")
    for col in ("image", "upload+confirm", "queue->OCR", "OCR", "->embedded", "->searchable",
                "total"):
        table.add_column(col, justify="right" if col != "image" else "left")
    for u in uploads:
        s = u.stages
        ready, started = s.get("image.ocr_requested"), s.get("image.ocr_started")
        ocr_done, embedded = s.get("image.ocr_completed"), s.get("image.embedded")
        if None in (ready, started, ocr_done, embedded, u.searchable_at):
            continue
        table.add_row(u.title, f"{ready - u.submitted:.2f}", f"{started - ready:.2f}",
                      f"{ocr_done - started:.2f}", f"{embedded - ocr_done:.2f}",
                      f"{u.searchable_at - embedded:.2f}", f"{u.searchable_at - u.submitted:.2f}")
    console.print(table)
    first = min(u.submitted for u in uploads)
    last = max(u.searchable_at or 0 for u in uploads)
    console.print(f"{len(uploads)} images searchable in {last - first:.1f} s: "
                  f"{len(uploads) / (last - first):.2f} images/s through the whole pipeline")


def _print_queries(console: Console, api: str, titles: dict[str, str]) -> None:
    auth = {"Authorization": f"Bearer {DEMO_KEY}"}
    table = Table(title="Queries")
    for col in ("query", "mode", "top results"):
        table.add_column(col)
    for q, mode in QUERIES:
        r = requests.get(f"{api}/v1/search", params={"q": q, "mode": mode, "limit": 3},
                         headers=auth, timeout=30)
        r.raise_for_status()
        hits = [f"{titles.get(h['id'], h['title'])} ({h['score']:.3f})" for h in r.json()["items"]]
        table.add_row(q, mode, "; ".join(hits) or "-")
    console.print(table)
