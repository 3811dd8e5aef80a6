"""`outbox project`: run one projector as its own process."""

from __future__ import annotations

import argparse

from outbox.cli import print_fields, print_report, service_arguments


def _cmd_project(args: argparse.Namespace) -> int:
    """Run one installed projector until SIGTERM."""
    import sys

    from outbox.observability import configure_logging, metrics_host
    from outbox.tracing import configure_tracing
    from projectors.discovery import ProjectorConflict, ProjectorNotFound, load_spec
    from projectors.registry import serve_projector

    try:
        spec = load_spec(args.name)
        settings = spec.settings()
    except (ProjectorNotFound, ProjectorConflict) as exc:
        print(f"outbox project: {exc}", file=sys.stderr)
        return 2
    configure_logging(f"projector-{args.name}", args.log_level)
    configure_tracing(f"outbox-projector-{args.name}", settings)
    port = spec.metrics_port if args.metrics_port is None else args.metrics_port
    return serve_projector(settings, spec, metrics_host(args.metrics_host, settings), port)


def _cmd_dlq(args: argparse.Namespace) -> int:
    """List the dead letters of a topic, or publish them again to their source."""
    import sys

    from confluent_kafka import KafkaException

    from outbox.settings import get_settings
    from projectors.dead_letters import list_dead_letters, replay

    if ".dlq." not in args.topic:
        print(f"outbox dlq: {args.topic!r} is not a dead-letter topic (<topic>.dlq.<consumer>)",
              file=sys.stderr)
        return 2
    try:
        if args.action == "list":
            letters = list_dead_letters(get_settings(), args.topic)
            print_report(letters, args.json, _print_letters)
            return 0
        print_report(replay(get_settings(), args.topic), args.json, print_fields)
        return 0
    except (KafkaException, KeyError, RuntimeError) as exc:
        print(f"outbox dlq {args.action}: {exc}", file=sys.stderr)
        return 2


def _print_letters(letters: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{len(letters)} dead letters")
    for col in ("partition/offset", "event", "type", "reason", "source", "replayable"):
        table.add_column(col)
    for d in letters:
        table.add_row(f"{d['partition']}/{d['offset']}", d["event_id"] or "-", d["type"] or "-",
                      d["reason"] or "-", f"{d['source_topic']}@{d['source_offset']}",
                      "yes" if d["replayable"] else "no (payload omitted)")
    Console().print(table)


def register(sub: argparse._SubParsersAction) -> None:
    """Add `project` to the `outbox` command line."""
    from projectors.discovery import projector_names

    # The names come from the installed entry points' metadata: nothing is imported here.
    p = sub.add_parser("project", help="run one installed projector (a consumer group of "
                                       "its own)")
    p.add_argument("name", metavar="NAME",
                   help=f"an installed projector: {', '.join(projector_names()) or 'none'} "
                        "(entry-point group outbox.projectors)")
    service_arguments(p, metrics_port=None, default_help="the projector's own default port")
    p.set_defaults(func=_cmd_project)

    p = sub.add_parser("dlq", help="list dead letters with their reasons, or replay them to "
                                   "their source topic once the cause is fixed")
    p.add_argument("action", choices=["list", "replay"])
    p.add_argument("topic", help="a dead-letter topic, <topic>.dlq.<consumer>")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_cmd_dlq)
