"""The example application's commands: `outbox api`, `outbox reconcile`, `outbox demo`."""

from __future__ import annotations

import argparse
import json

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

    p = sub.add_parser("demo", help="the main job end to end: upload, OCR, embed, search")
    p.add_argument("--state-dir", default=".outbox", help="where PID files and logs go")
    p.set_defaults(func=_cmd_demo)
