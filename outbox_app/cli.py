"""The example application's commands: `outbox api`, `outbox reconcile`, `outbox demo`, and
the operator's tools (status, audit, rebuild, trace, retry).

They are registered in a core-only install too, importing nothing beyond the core; each
checks first that the extra it needs is installed, and names it when it is not."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from outbox.cli import print_fields, print_report, service_arguments
from outbox.extras import require_extra

Command = Callable[[argparse.Namespace], int]


def _needing(extra: str, command: Command) -> Command:
    """`command`, run once `extra` is known to be installed."""
    def run(args: argparse.Namespace) -> int:
        require_extra("the command", extra)  # the message is prefixed with the command
        return command(args)
    return run


def _cmd_api(args: argparse.Namespace) -> int:
    """Serve the HTTP API with uvicorn (SIGTERM: finish in-flight requests, then exit)."""
    import uvicorn

    from outbox.observability import configure_logging, metrics_host
    from outbox.tracing import configure_tracing, shutdown_tracing
    from outbox_app.api.app import create_app
    from outbox_app.settings import get_app_settings

    configure_logging("api", args.log_level)
    configure_tracing("outbox-api", get_app_settings())
    host = metrics_host(args.host, get_app_settings())  # /metrics and probes: the API's port
    try:
        uvicorn.run(create_app(), host=host, port=args.port, log_config=None,
                    timeout_graceful_shutdown=10)
    finally:
        shutdown_tracing()  # the spans still buffered
    return 0


def _cmd_reconcile(args: argparse.Namespace) -> int:
    """Repair images whose state deadline passed, every --interval seconds; audit a part of
    the table and repair drift every OUTBOX_RECONCILER_AUDIT_INTERVAL_S; rebuild a lost view."""
    import logging

    from outbox.db import make_engine
    from outbox.observability import configure_logging, metrics_host, serve_until_stopped
    from outbox.readiness import CachedProbes, readiness_report
    from outbox_app.reconciler import Reconciler
    from outbox_app.reconciler_checks import round_checks
    from outbox_app.settings import get_app_settings
    from outbox_app.sink_probes import store_probes
    from outbox_images.storage import s3_client

    configure_logging("reconciler", args.log_level)
    # Each round asks the search server whether its alias exists: not worth a line a round.
    logging.getLogger("elastic_transport").setLevel(logging.WARNING)
    settings = get_app_settings()
    engine, s3 = make_engine(settings), s3_client(settings)
    rec = Reconciler(settings, engine, s3)
    rec.checks = round_checks(settings, engine, s3, stop=rec.stop)
    if args.once:
        done = rec.run_once() + rec.run_checks()
        print_report(done, args.json, lambda d: print_fields({"images repaired, by state": d}))
        return 0
    probes = CachedProbes(store_probes(settings, ("database", "s3")))
    return serve_until_stopped(rec.stop, rec.health, metrics_host(args.metrics_host, settings),
                               args.metrics_port,
                               lambda: rec.run(args.interval),
                               ready=lambda: readiness_report(probes.results()))


def _cmd_demo(args: argparse.Namespace) -> int:
    """Run the whole pipeline end to end on the local stack."""
    from pathlib import Path

    from outbox_app.demo import run_demo
    from outbox_app.settings import get_app_settings

    return run_demo(get_app_settings(), Path(args.state_dir))


def _cmd_audit(args: argparse.Namespace) -> int:
    """Compare the database with the search view, the task cache and the bucket; with
    --repair, heal what was found. Exit 0 clean, 1 drift found, 2 could not complete."""
    import sys
    from collections import Counter

    import redis
    from elasticsearch import Elasticsearch

    from outbox.db import make_engine
    from outbox_app.audit import AuditIncomplete, Auditor, Repairer, finding_dict
    from outbox_app.settings import get_app_settings
    from outbox_images.storage import s3_client

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
    print_report(report, args.json, _print_audit)
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
    """Rebuild a projector's view from the log behind the live one, then switch the readers
    to it (any installed projector whose spec declares a rebuild). Exit 3 when another
    rebuild of the view is running."""
    import sys
    import time

    from rich.progress import Progress as Bar

    from outbox.observability import configure_logging
    from projectors.discovery import ProjectorConflict, ProjectorNotFound, load_spec, load_specs
    from projectors.rebuild import Progress, RebuildRefused
    from projectors.rebuild_lock import RebuildBusy

    try:
        spec = load_spec(args.view)
        if spec.rebuild is None:
            views = [n for n, s in load_specs().items() if s.rebuild is not None]
            print(f"outbox rebuild: projector {args.view!r} has no rebuildable view; "
                  f"rebuildable: {', '.join(views) or 'none'}", file=sys.stderr)
            return 2
    except (ProjectorNotFound, ProjectorConflict) as exc:
        print(f"outbox rebuild: {exc}", file=sys.stderr)
        return 2
    if args.verify:  # the image audit checks the copy
        require_extra("--verify", "api")
    configure_logging("rebuild", "WARNING")
    settings = spec.settings()
    started = time.monotonic()
    with Bar(transient=True) as bar:
        task = bar.add_task(f"rebuild {args.view}", total=None)

        def show(p: Progress) -> None:
            rate = p.applied / max(1e-6, time.monotonic() - started)
            bar.update(task, completed=p.applied, description=(
                f"{args.view}: {p.phase}, {p.applied} events, {rate:.0f}/s, lag {p.lag}"))

        rebuild = spec.rebuild(settings, show)
        if args.verify:
            _verify_with_audit(rebuild)
        try:
            summary = rebuild.run(verify=args.verify, keep_old=args.keep_old)
        except RebuildRefused as exc:
            print(f"outbox rebuild: not switched: {exc}", file=sys.stderr)
            return 1
        except InterruptedError as exc:
            print(f"outbox rebuild: {exc}", file=sys.stderr)
            return 130
        except RebuildBusy as exc:  # the reconciler healing it, or another person
            print(f"outbox rebuild: {exc}; try again once it is done", file=sys.stderr)
            return 3
    print_report(summary, args.json, print_fields)
    return 0


def _verify_with_audit(rebuild: Any) -> None:
    """The search view's copy is verified with the image audit before the switch."""
    import redis
    from elasticsearch import Elasticsearch

    from outbox.db import make_engine
    from outbox_app.audit import Auditor
    from outbox_app.settings import get_app_settings
    from outbox_app.view_rebuilds import SearchRebuild
    from outbox_images.storage import s3_client

    if not isinstance(rebuild, SearchRebuild):
        return
    settings = get_app_settings()
    client = redis.Redis.from_url(settings.redis_url)
    es = Elasticsearch(settings.es_url)

    def differences(index: str) -> list[str]:
        auditor = Auditor(settings.model_copy(update={"es_index": index}), make_engine(settings),
                          es, client, s3_client(settings))
        return [f"{f.kind} {f.image_id}: {f.detail}" for f in auditor.view_findings()]

    rebuild.verify_copy = differences


def _cmd_trace(args: argparse.Namespace) -> int:
    """Show one image's journey (history, views, object); exit 1 when it does not exist."""
    import sys
    import uuid

    import redis
    from elasticsearch import Elasticsearch

    from outbox.db import make_engine
    from outbox_app.settings import get_app_settings
    from outbox_app.trace import ImageTrace
    from outbox_images.storage import s3_client
    from outbox_images.store import ImageNotFound

    try:
        image_id = uuid.UUID(args.image_id)
    except ValueError:
        print(f"outbox trace: {args.image_id!r} is not an image id", file=sys.stderr)
        return 2
    s = get_app_settings()
    trace = ImageTrace(s, make_engine(s), Elasticsearch(s.es_url),
                       redis.Redis.from_url(s.redis_url), s3_client(s))
    try:
        journey = trace.journey(image_id, args.org, scan_kafka=args.kafka_offsets)
    except ImageNotFound as exc:
        print(f"outbox trace: {exc}", file=sys.stderr)
        return 1
    print_report(journey, args.json, _print_trace)
    return 0


def _print_trace(journey: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    image, views, obj = journey["image"], journey["views"], journey["object"]
    console = Console()
    console.print(f"image {image['id']} (org {image['org_id']}): {image['state']} at version "
                  f"{image['version']}, trace {image['trace_id']}")
    table = Table()
    for col in ("at", "v", "event", "state", "attempt", "error", "kafka", "event id"):
        table.add_column(col)
    for e in journey["history"]:
        k = e["kafka"]
        where = f"{k['topic']}/{k['partition']}" + ("" if k["offset"] is None
                                                     else f"@{k['offset']}")
        table.add_row(e["at"][:23], str(e["version"]), e["type"], e["state"],
                      str(e["attempts"]), e["error"] or "", where, e["event_id"])
    console.print(table)
    console.print(f"search view holds version {views['search'].get('holds')}; task cache "
                  f"holds version {views['task_cache'].get('holds')}")
    console.print(f"object {obj['key']}: " + ("present, " + str(obj.get("size")) + " bytes"
                                               if obj.get("exists") else "missing"))


def _cmd_retry(args: argparse.Namespace) -> int:
    """Send failed images back to pending; exit 1 when an id could not be retried."""
    import sys
    import uuid

    from outbox.db import make_engine
    from outbox_app.retry import failed_images, retry
    from outbox_app.settings import get_app_settings
    from outbox_images.policy import ImageState
    from outbox_images.storage import s3_client

    if bool(args.ids) == bool(args.state):
        print("outbox retry: give image ids or --state, not both", file=sys.stderr)
        return 2
    try:
        ids = [uuid.UUID(i) for i in args.ids]
    except ValueError as exc:
        print(f"outbox retry: not an image id: {exc}", file=sys.stderr)
        return 2
    settings = get_app_settings()
    engine = make_engine(settings)
    chosen = ids or failed_images(engine, ImageState(args.state), args.org)
    done = retry(engine, settings, s3_client(settings), chosen, args.org)
    print_report(done, args.json, print_fields)
    return 1 if ids and done["skipped"] else 0


def _cmd_status(args: argparse.Namespace) -> int:
    """Print the pipeline's status; exit 0 healthy, 1 when something needs attention, 2 when
    it could not be told."""
    import sys
    import time

    from outbox.db import make_engine
    from outbox_app.settings import get_app_settings
    from outbox_app.status import StatusCollector, StatusIncomplete
    from outbox_app.status_table import print_status

    if args.limit < 1 or args.window < 0 or args.max_lag_s < 0:
        print("outbox status: --limit must be at least 1, --window and --max-lag-s not "
              "negative", file=sys.stderr)
        return 2
    settings = get_app_settings()
    collector = StatusCollector(settings, make_engine(settings))
    try:
        if args.window > 0:  # throughput: the committed offsets now and after the window
            started = time.monotonic()
            collector.sample_throughput()
            time.sleep(max(0.0, args.window - (time.monotonic() - started)))
        report = collector.snapshot(args.org, max_lag_s=args.max_lag_s, limit=args.limit)
    except StatusIncomplete as exc:
        print(f"outbox status: could not complete: {exc}", file=sys.stderr)
        return 2
    print_report(report, args.json, print_status)
    return 0 if report["healthy"] else 1


def register(sub: argparse._SubParsersAction) -> None:
    """Add the application's commands to the `outbox` command line."""
    p = sub.add_parser("api", help="serve the example application's HTTP API")
    p.add_argument("--host", default=None,
                   help="address to serve on, /metrics and the probes included (default: the "
                        "metrics_host setting, OUTBOX_METRICS_HOST, itself 127.0.0.1 by default)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--log-level", default="INFO")
    p.set_defaults(func=_needing("api", _cmd_api))

    p = sub.add_parser("reconcile", help="repair stuck, orphaned and expired images")
    p.add_argument("--interval", type=float, default=10.0, help="seconds between rounds")
    p.add_argument("--once", action="store_true", help="one round, print what was done")
    p.add_argument("--json", action="store_true", help="--once: machine-readable output")
    service_arguments(p, metrics_port=9469)
    p.set_defaults(func=_needing("api", _cmd_reconcile))

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
    p.set_defaults(func=_needing("api", _cmd_audit))

    p = sub.add_parser("rebuild", help="rebuild a view from the log behind the live one, "
                                       "then switch to it (no downtime)")
    p.add_argument("view", metavar="NAME",
                   help="a projector with a rebuildable view: search, cache, or an installed "
                        "one whose spec declares a rebuild")
    p.add_argument("--verify", action="store_true",
                   help="search: audit the new index first; refuse to switch on drift")
    p.add_argument("--keep-old", action="store_true", help="keep the old index or keys")
    p.add_argument("--json", action="store_true", help="machine-readable summary")
    p.set_defaults(func=_cmd_rebuild)

    p = sub.add_parser("trace", help="one image's journey: state changes, views, object")
    p.add_argument("image_id")
    p.add_argument("--org", default=None, help="only if the image belongs to this org")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--kafka-offsets", type=int, default=0, metavar="N",
                   help="read up to N messages of the image's partition to find the offsets")
    p.set_defaults(func=_needing("images", _cmd_trace))

    p = sub.add_parser("retry", help="send failed images back to pending (a guarded "
                                     "transition with its event)")
    p.add_argument("ids", nargs="*", help="image ids")
    p.add_argument("--state", choices=["ocr_failed", "embedding_failed"],
                   help="every image in this state instead")
    p.add_argument("--org", default=None, help="only images of this org")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_needing("api", _cmd_retry))

    p = sub.add_parser("status", help="services, relay, projector lags, images per state, "
                                      "overdue and failed images, dead letters (exit 0 "
                                      "healthy, 1 attention, 2 incomplete)",
                       description="The pipeline at a glance, as one table. Exit 0 when nothing "
                                   "needs attention, 1 when something does (each reason is "
                                   "printed), 2 when the status could not be told.")
    p.add_argument("--org", default=None, help="only this org's images and dead letters")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--max-lag-s", type=float, default=60.0,
                   help="a relay or projector whose oldest waiting event is older needs "
                        "attention (default 60)")
    p.add_argument("--limit", type=int, default=20,
                   help="overdue and failed images listed (all are counted)")
    p.add_argument("--window", type=float, default=1.0,
                   help="seconds over which projector throughput is measured (0: not measured)")
    p.set_defaults(func=_needing("api", _cmd_status))

    p = sub.add_parser("demo", help="the main job end to end: upload, OCR, embed, search")
    p.add_argument("--state-dir", default=".outbox", help="where PID files and logs go")
    p.set_defaults(func=_needing("images", _cmd_demo))
