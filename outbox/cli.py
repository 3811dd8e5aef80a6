"""The `outbox` command line: migrations, the API, relays, projectors and the demo."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence

from outbox.settings import get_settings

# Defaults that let the four projectors run side by side on one host.
PROJECTOR_METRICS_PORTS = {"ocr": 9465, "embed": 9466, "search": 9467, "cache": 9468}


def _cmd_config(_: argparse.Namespace) -> int:
    """Print where each service is, as this process sees the configuration."""
    s = get_settings()
    rows = {
        "database": f"{s.database_url.split('@')[-1]} schema={s.db_schema}",
        "kafka": f"{s.kafka_bootstrap} topics={s.topic_prefix}.<aggregate_type>",
        "s3": f"{s.s3_endpoint} bucket={s.s3_bucket}",
        "search": f"{s.es_url} index={s.es_index}",
        "redis": f"{s.redis_url} prefix={s.redis_prefix}",
    }
    for name, where in rows.items():
        print(f"{name:9} {where}")
    return 0


def _cmd_migrate(args: argparse.Namespace) -> int:
    """Apply the database migrations."""
    from outbox.migrate import migrate

    migrate(get_settings(), args.revision)
    print(f"database schema {get_settings().db_schema!r} at {args.revision}")
    return 0


def _cmd_api(args: argparse.Namespace) -> int:
    """Serve the HTTP API with uvicorn (SIGTERM: finish in-flight requests, then exit)."""
    import uvicorn

    from outbox.api.app import create_app
    from outbox.observability import configure_logging

    configure_logging("api", args.log_level)
    uvicorn.run(create_app(), host=args.host, port=args.port, log_config=None,
                timeout_graceful_shutdown=10)
    return 0


def _cmd_relay(args: argparse.Namespace) -> int:
    """Publish the outbox to Kafka until SIGTERM."""
    from outbox.observability import configure_logging
    from relays.runner import serve_relay

    configure_logging(f"relay-{args.mode}", args.log_level)
    return serve_relay(get_settings(), args.mode, args.metrics_host, args.metrics_port)


def _cmd_project(args: argparse.Namespace) -> int:
    """Run one projector until SIGTERM."""
    from outbox.observability import configure_logging
    from projectors.registry import serve_projector

    configure_logging(f"projector-{args.name}", args.log_level)
    port = PROJECTOR_METRICS_PORTS[args.name] if args.metrics_port is None else args.metrics_port
    return serve_projector(get_settings(), args.name, args.metrics_host, port)


def _cmd_reconcile(args: argparse.Namespace) -> int:
    """Repair images whose state deadline passed, every --interval seconds."""
    from outbox.db import make_engine
    from outbox.observability import configure_logging, serve_until_stopped
    from outbox.reconciler import Reconciler
    from outbox.storage import s3_client

    configure_logging("reconciler", args.log_level)
    settings = get_settings()
    rec = Reconciler(settings, make_engine(settings), s3_client(settings))
    if args.once:
        print(json.dumps(rec.run_once()))
        return 0
    return serve_until_stopped(rec.stop, rec.health, args.metrics_host, args.metrics_port,
                               lambda: rec.run(args.interval))


def _cmd_demo(args: argparse.Namespace) -> int:
    """Run the whole pipeline end to end on the local stack."""
    from pathlib import Path

    from outbox.demo import run_demo

    return run_demo(get_settings(), Path(args.state_dir))


def _cmd_schema(args: argparse.Namespace) -> int:
    """Print the event envelope's JSON schema, or rewrite the published file."""
    from outbox.envelope import SCHEMA_PATH, envelope_json_schema, write_json_schema

    if args.write:
        write_json_schema()
        print(f"wrote {SCHEMA_PATH}")
    else:
        print(json.dumps(envelope_json_schema(), indent=2, sort_keys=True))
    return 0


def _service_arguments(p: argparse.ArgumentParser, metrics_port: int | None,
                       default_help: str = "") -> None:
    p.add_argument("--metrics-host", default="127.0.0.1")
    p.add_argument("--metrics-port", type=int, default=metrics_port,
                   help=f"/metrics and /healthz (0: any free port; default: "
                        f"{default_help or metrics_port})")
    p.add_argument("--log-level", default="INFO")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    parser = argparse.ArgumentParser(prog="outbox", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("config", help="show the service addresses this process would use")
    p.set_defaults(func=_cmd_config)

    p = sub.add_parser("migrate", help="apply the database migrations (Alembic)")
    p.add_argument("--revision", default="head", help="target revision (default: head)")
    p.set_defaults(func=_cmd_migrate)

    p = sub.add_parser("api", help="serve the example application's HTTP API")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--log-level", default="INFO")
    p.set_defaults(func=_cmd_api)

    p = sub.add_parser("relay", help="publish the outbox to Kafka (one active per outbox)")
    p.add_argument("--mode", choices=["logical", "poll"], default="logical",
                   help="logical decoding (default) or polling for databases without it")
    _service_arguments(p, metrics_port=9464)
    p.set_defaults(func=_cmd_relay)

    p = sub.add_parser("project", help="run one projector (a consumer group of its own)")
    p.add_argument("name", choices=list(PROJECTOR_METRICS_PORTS),
                   help="ocr/embed write results back through the outbox; search/cache are views")
    _service_arguments(p, metrics_port=None,
                       default_help=", ".join(f"{n} {port}" for n, port in
                                              PROJECTOR_METRICS_PORTS.items()))
    p.set_defaults(func=_cmd_project)

    p = sub.add_parser("reconcile", help="repair stuck, orphaned and expired images")
    p.add_argument("--interval", type=float, default=10.0, help="seconds between rounds")
    p.add_argument("--once", action="store_true", help="one round, print what was done")
    _service_arguments(p, metrics_port=9469)
    p.set_defaults(func=_cmd_reconcile)

    p = sub.add_parser("demo", help="the main job end to end: upload, OCR, embed, search")
    p.add_argument("--state-dir", default=".outbox", help="where PID files and logs go")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("schema", help="the event envelope's JSON schema")
    p.add_argument("--write", action="store_true", help="rewrite outbox/schemas/ instead")
    p.set_defaults(func=_cmd_schema)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `outbox` console script."""
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
