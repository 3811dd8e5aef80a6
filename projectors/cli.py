"""`outbox project`: run one projector as its own process."""

from __future__ import annotations

import argparse

from outbox.cli import service_arguments

NAMES = ("ocr", "embed", "search", "cache")


def _cmd_project(args: argparse.Namespace) -> int:
    """Run one projector until SIGTERM."""
    from outbox.observability import configure_logging
    from projectors.registry import METRICS_PORTS, serve_projector
    from projectors.settings import ProjectorSettings

    configure_logging(f"projector-{args.name}", args.log_level)
    port = METRICS_PORTS[args.name] if args.metrics_port is None else args.metrics_port
    return serve_projector(ProjectorSettings(), args.name, args.metrics_host, port)


def register(sub: argparse._SubParsersAction) -> None:
    """Add `project` to the `outbox` command line."""
    p = sub.add_parser("project", help="run one projector (a consumer group of its own)")
    p.add_argument("name", choices=NAMES,
                   help="ocr/embed write results back through the outbox; search/cache are views")
    service_arguments(p, metrics_port=None,
                      default_help="ocr 9465, embed 9466, search 9467, cache 9468")
    p.set_defaults(func=_cmd_project)
