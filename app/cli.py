"""The example application's commands: `outbox api`, `outbox reconcile`, `outbox demo`."""

from __future__ import annotations

import argparse
import json
from typing import Any

from outbox.cli import service_arguments


def _cmd_api(args: argparse.Namespace) -> int:
    """Serve the HTTP API with uvicorn (SIGTERM: finish in-flight requests, then exit)."""
    import uvicorn

    from app.api.app import create_app
    from outbox.observability import configure_logging

    configure_logging("api", args.log_level)
    uvicorn.run(create_app(), host=args.host, port=args.port, log_config=None,
                timeout_graceful_shutdown=10)
    return 0


def _cmd_reconcile(args: argparse.Namespace) -> int:
    """Repair images whose state deadline passed, every --interval seconds."""
    from app.reconciler import Reconciler
    from app.settings import get_app_settings
    from images.storage import s3_client
    from outbox.db import make_engine
    from outbox.observability import configure_logging, serve_until_stopped

    configure_logging("reconciler", args.log_level)
    settings = get_app_settings()
    rec = Reconciler(settings, make_engine(settings), s3_client(settings))
    if args.once:
        print(json.dumps(rec.run_once()))
        return 0
    return serve_until_stopped(rec.stop, rec.health, args.metrics_host, args.metrics_port,
                               lambda: rec.run(args.interval))


def _cmd_demo(args: argparse.Namespace) -> int:
    """Run the whole pipeline end to end on the local stack."""
    from pathlib import Path

    from app.demo import run_demo
    from app.settings import get_app_settings

    return run_demo(get_app_settings(), Path(args.state_dir))


def _cmd_audit(args: argparse.Namespace) -> int:
    """Compare the database with the search view, the task cache and the bucket; with
    --repair, heal what was found. Exit 0 clean, 1 drift found, 2 could not complete."""
    import sys
    from collections import Counter

    import redis
    from elasticsearch import Elasticsearch

    from app.audit import AuditIncomplete, Auditor, Repairer, finding_dict
    from app.settings import get_app_settings
    from images.storage import s3_client
    from outbox.db import make_engine

    settings = get_app_settings()
    engine, s3 = make_engine(settings), s3_client(settings)
    auditor = Auditor(settings, engine, Elasticsearch(settings.es_url),
                      redis.Redis.from_url(settings.redis_url), s3, org=args.org,
                      grace_s=args.grace)
    repairer = Repairer(settings, engine, s3) if args.repair else None
    found, counts = [], Counter()
    try:
        for finding in auditor.findings():
            counts[finding.kind] += 1
            if len(found) < args.limit:
                found.append(finding)
            if repairer is not None:
                repairer.repair(finding)
    except AuditIncomplete as exc:
        print(f"outbox audit: could not complete: {exc}", file=sys.stderr)
        return 2
    report = {"rows": auditor.rows_read, "findings": dict(counts),
              "repaired": dict(repairer.done) if repairer else None,
              "items": [finding_dict(f) for f in found]}
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print_audit(report)
    return 1 if counts else 0


def _print_audit(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    console.print(f"{report['rows']} rows audited; findings: "
                  f"{report['findings'] or 'none'}")
    if report["items"]:
        table = Table()
        for col in ("kind", "image", "org", "detail"):
            table.add_column(col)
        for f in report["items"]:
            table.add_row(f["kind"], f["image_id"], f["org_id"] or "-", f["detail"])
        console.print(table)
    if report["repaired"] is not None:
        console.print(f"repaired: {report['repaired'] or 'nothing'}")


def _cmd_rebuild(args: argparse.Namespace) -> int:
    """Rebuild a view from the log behind the live one, then switch the readers to it."""
    import sys
    import time

    from rich.progress import Progress as Bar

    from app.settings import get_app_settings
    from outbox.observability import configure_logging
    from projectors.rebuild import Progress, RebuildRefused

    configure_logging("rebuild", "WARNING")
    settings = get_app_settings()
    started = time.monotonic()
    with Bar(transient=True) as bar:
        task = bar.add_task(f"rebuild {args.view}", total=None)

        def show(p: Progress) -> None:
            rate = p.applied / max(1e-6, time.monotonic() - started)
            bar.update(task, completed=p.applied, description=(
                f"{args.view}: {p.phase}, {p.applied} events, {rate:.0f}/s, lag {p.lag}"))

        rebuild = _rebuild_of(args.view, settings, show)
        try:
            summary = rebuild.run(verify=args.verify, keep_old=args.keep_old)
        except RebuildRefused as exc:
            print(f"outbox rebuild: not switched: {exc}", file=sys.stderr)
            return 1
        except InterruptedError as exc:
            print(f"outbox rebuild: {exc}", file=sys.stderr)
            return 130
    print(json.dumps(summary))
    return 0


def _rebuild_of(view: str, settings: Any, show: Any) -> Any:
    """The rebuild of `view`; the search one verifies its copy with the audit."""
    import redis
    from elasticsearch import Elasticsearch

    from app.audit import Auditor
    from images.storage import s3_client
    from outbox.db import make_engine
    from projectors.rebuild import CacheRebuild, SearchRebuild

    client = redis.Redis.from_url(settings.redis_url)
    if view == "cache":
        return CacheRebuild(settings, client, on_progress=show)
    es = Elasticsearch(settings.es_url)

    def differences(index: str) -> list[str]:
        auditor = Auditor(settings.model_copy(update={"es_index": index}), make_engine(settings),
                          es, client, s3_client(settings))
        return [f"{f.kind} {f.image_id}: {f.detail}" for f in auditor.view_findings()]

    return SearchRebuild(settings, es, verify_copy=differences, on_progress=show)


def register(sub: argparse._SubParsersAction) -> None:
    """Add the application's commands to the `outbox` command line."""
    p = sub.add_parser("api", help="serve the example application's HTTP API")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--log-level", default="INFO")
    p.set_defaults(func=_cmd_api)

    p = sub.add_parser("reconcile", help="repair stuck, orphaned and expired images")
    p.add_argument("--interval", type=float, default=10.0, help="seconds between rounds")
    p.add_argument("--once", action="store_true", help="one round, print what was done")
    service_arguments(p, metrics_port=9469)
    p.set_defaults(func=_cmd_reconcile)

    p = sub.add_parser("audit", help="compare the database with the views and the bucket "
                                     "(exit 0 clean, 1 drift, 2 incomplete)")
    p.add_argument("--repair", action="store_true",
                   help="heal the findings: resync events, orphan objects deleted, images "
                        "whose object is gone failed")
    p.add_argument("--json", action="store_true", help="machine-readable report")
    p.add_argument("--org", default=None, help="only this org")
    p.add_argument("--grace", type=float, default=60.0,
                   help="seconds a change may take to reach the views (default 60)")
    p.add_argument("--limit", type=int, default=1000, help="findings listed (all are counted)")
    p.set_defaults(func=_cmd_audit)

    p = sub.add_parser("rebuild", help="rebuild a view from the log behind the live one, "
                                       "then switch to it (no downtime)")
    p.add_argument("view", choices=["search", "cache"])
    p.add_argument("--verify", action="store_true",
                   help="search: audit the new index first; refuse to switch on drift")
    p.add_argument("--keep-old", action="store_true", help="keep the old index or keys")
    p.set_defaults(func=_cmd_rebuild)

    p = sub.add_parser("demo", help="the main job end to end: upload, OCR, embed, search")
    p.add_argument("--state-dir", default=".outbox", help="where PID files and logs go")
    p.set_defaults(func=_cmd_demo)
