"""The `outbox` command line.

The core registers its own commands (config, migrate, grants, schema, topics); packages
built on it add theirs through the entry-point group `outbox.commands` (a
`register(subparsers)` function), so this module imports nothing above the core.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from importlib.metadata import entry_points
from typing import Any

from pydantic import ValidationError

from outbox.settings import get_settings
from outbox.settings_sources import CONFIG_FILE_VARIABLE, ConfigurationError


def print_report(report: Any, as_json: bool, render: Callable[[Any], None]) -> None:
    """A command's result: JSON for machines (`--json`), else `render`'s table."""
    if as_json:
        print(json.dumps(report, indent=2, default=str))
    else:
        render(report)


def print_fields(report: Mapping[str, Any]) -> None:
    """A report that needs no table, as one `key: value` line per field (lists and mappings
    on their line)."""
    for key, value in report.items():
        if isinstance(value, Mapping):
            text = ", ".join(f"{k}: {v}" for k, v in value.items()) or "none"
        elif isinstance(value, list | tuple):
            text = ", ".join(map(str, value)) or "none"
        else:
            text = "-" if value is None else str(value)
        print(f"{key.replace('_', ' ')}: {text}")


def _configuration_problems() -> list[str]:
    """Unknown `OUTBOX_*` variables and configuration-file keys, and secrets set twice, one
    message each."""
    from outbox.settings_registry import (
        conflicting_secrets,
        installed_classes,
        settings_of,
        unknown_file_keys,
        unknown_variables,
    )
    from outbox.settings_sources import load_config_file

    settings = settings_of(installed_classes())
    return (unknown_variables(settings) + conflicting_secrets(settings)
            + unknown_file_keys(settings, load_config_file()))


def _cmd_config(args: argparse.Namespace) -> int:
    """Show every setting's value and where it came from (environment, file-secret, file,
    default, or missing), secrets masked. Exit 2 when a variable or file key is unknown.
    Every setting's documentation is the site's settings reference, generated from the same
    classes."""
    from outbox.settings_registry import installed_classes, settings_of
    from outbox.settings_report import origins, render_text
    from outbox.settings_sources import load_config_file

    problems = _configuration_problems()
    rows = origins(settings_of(installed_classes()), file_data=load_config_file())
    print_report({"settings": rows, "problems": problems}, args.json,
                 lambda report: print(render_text(report["settings"])))
    for problem in problems:
        print(f"outbox config: {problem}", file=sys.stderr)
    return 2 if problems else 0


def _cmd_migrate(args: argparse.Namespace) -> int:
    """Apply the database migrations of the core and of every registered package."""
    from outbox.migrate import migrate

    migrate(get_settings(), args.revision, only=args.history)
    report = {"schema": get_settings().db_schema, "revision": args.revision,
              "history": args.history or "all"}
    print_report(report, args.json, lambda r: print(f"database schema {r['schema']!r} at "
                                                    f"{r['revision']}"))
    return 0


def _cmd_grants(args: argparse.Namespace) -> int:
    """Print (or with --apply, run as the configured owner) the SQL that gives the
    application's and the relay's roles what they need in the schema."""
    from outbox.grants import grants_sql
    from outbox.migrate import histories

    schema = args.schema or get_settings().db_schema
    try:
        sql = grants_sql(schema, args.app, args.relay, histories(), owner=args.owner)
    except ValueError as exc:
        print(f"outbox grants: {exc}", file=sys.stderr)
        return 2
    if not args.apply:
        print(sql, end="")
        return 0
    import psycopg

    from outbox.db import libpq_dsn

    with psycopg.connect(libpq_dsn(get_settings().model_copy(update={"db_schema": schema})),
                         autocommit=True) as conn:
        conn.execute(sql)
    print(f"granted {args.app} (application) and {args.relay} (relay) in schema {schema!r}")
    return 0


def _cmd_schema(args: argparse.Namespace) -> int:
    """Print the event envelope's JSON schema, or rewrite the published file."""
    from outbox.envelope import SCHEMA_PATH, envelope_json_schema, write_json_schema

    if args.write:
        write_json_schema()
        print(f"wrote {SCHEMA_PATH}")
    else:
        print(json.dumps(envelope_json_schema(), indent=2, sort_keys=True))
    return 0


def _aggregate_type(value: str) -> str:
    """An aggregate type that makes a legal Kafka topic name (checked here: some brokers
    accept any name)."""
    if not re.fullmatch(r"[A-Za-z0-9._-]{1,200}", value):
        raise argparse.ArgumentTypeError(
            f"{value!r} is not an aggregate type (1 to 200 of A-Z a-z 0-9 . _ -)")
    return value


def _create_topics(aggregate_types: list[str]) -> str | None:
    """Create each aggregate type's event topic (`<prefix>.<type>`, or its debezium topic)
    unless it exists, as the relay would (configured partitions, replication and retention);
    the error text when that failed."""
    from confluent_kafka import KafkaException

    from outbox.kafka import TopicManager
    from outbox.observability import configure_logging
    from outbox.wire_formats import event_topic

    configure_logging("topics")  # JSON lines on stderr; the report goes to stdout
    s = get_settings()
    manager = TopicManager(s)
    try:
        for aggregate_type in aggregate_types:
            manager.ensure(event_topic(s, aggregate_type))
    except KafkaException as exc:
        return f"cannot create topics on {s.kafka_bootstrap}: {exc.args[0].str()}"
    return None


def _cmd_topics(args: argparse.Namespace) -> int:
    """Show what Kafka keeps of the `<prefix>.*` topics, after creating those of --create.
    Exit 0 when a replay from offset 0 gets every event of every topic (nothing deleted,
    infinite retention), 1 otherwise, 2 when Kafka cannot be reached or a topic not created."""
    from outbox.topics import KafkaUnreachable, describe_topics, replay_safe

    s = get_settings()
    error = _create_topics(args.create) if args.create else None
    if error:
        print(f"outbox topics: {error}", file=sys.stderr)
        return 2
    try:
        topics = describe_topics(s)
    except KafkaUnreachable as exc:
        print(f"outbox topics: {exc}", file=sys.stderr)
        return 2
    print_report(topics, args.json, lambda ts: _print_topics(ts, f"{s.topic_prefix}.* on "
                                                            f"{s.kafka_bootstrap}"))
    if not topics:
        print(f"no topics named {s.topic_prefix}.* on {s.kafka_bootstrap}", file=sys.stderr)
    return 0 if all(replay_safe(t) for t in topics) else 1


def _print_topics(topics: list[dict[str, Any]], title: str) -> None:
    from rich import box
    from rich.console import Console
    from rich.table import Table

    from outbox.topics import INFINITE_RETENTION, replay_safe

    table = Table(title=title, box=box.SIMPLE)
    table.add_column("topic", overflow="fold")
    for column in ("parts", "repl", "min.isr", "retention", "cleanup"):
        table.add_column(column, no_wrap=True)
    table.add_column("replay coverage", min_width=len("complete"))
    for t in topics:
        retention = t["retention_ms"]
        table.add_row(
            t["name"], str(t["partitions"]), str(t["replication_factor"]),
            t["min_insync_replicas"],
            "infinite" if retention == INFINITE_RETENTION else retention,
            t["cleanup_policy"], t["replay_coverage"],
            style=None if replay_safe(t) else "red",
        )
    Console().print(table)


def service_arguments(p: argparse.ArgumentParser, metrics_port: int | None,
                      default_help: str = "") -> None:
    """The options every long-running process takes: where to serve /metrics, /healthz and
    /readyz, and the log level."""
    p.add_argument("--metrics-host", default=None,
                   help="address to serve them on (default: the metrics_host setting, "
                        "OUTBOX_METRICS_HOST, itself 127.0.0.1 by default)")
    p.add_argument("--metrics-port", type=int, default=metrics_port,
                   help=f"/metrics, /healthz and /readyz (0: any free port; default: "
                        f"{default_help or metrics_port})")
    p.add_argument("--log-level", default="INFO")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with the core's subcommands and every registered one."""
    from outbox.extras import DISTRIBUTION, version

    parser = argparse.ArgumentParser(prog="outbox", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version",
                        version=f"%(prog)s ({DISTRIBUTION}) {version()}")
    parser.add_argument("--config", metavar="PATH",
                        help=f"the TOML configuration file (sets {CONFIG_FILE_VARIABLE}, so "
                             "the processes a command starts read it too); environment "
                             "variables override it")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("config", help="every setting's value and origin, secrets masked")
    p.add_argument("--json", action="store_true", help="JSON instead of a table")
    p.set_defaults(func=_cmd_config)

    p = sub.add_parser("migrate", help="apply the database migrations (Alembic)")
    p.add_argument("--revision", default="head", help="target revision (default: head)")
    p.add_argument("--history", default=None,
                   help="only this history (outbox, or a registered package's)")
    p.add_argument("--json", action="store_true", help="JSON instead of a line")
    p.set_defaults(func=_cmd_migrate)

    p = sub.add_parser("grants", help="the SQL giving the application's and the relay's "
                       "roles their privileges (run as the owner after each migrate)")
    p.add_argument("--app", required=True, help="the application's role")
    p.add_argument("--relay", required=True, help="the relay's role")
    p.add_argument("--owner", help="the role that owns the schema's objects (default "
                   "privileges are for what it creates; default: the role running the SQL)")
    p.add_argument("--schema", help="the outbox schema (default: OUTBOX_DB_SCHEMA)")
    p.add_argument("--apply", action="store_true",
                   help="run the SQL as OUTBOX_DATABASE_URL's role instead of printing it")
    p.set_defaults(func=_cmd_grants)

    p = sub.add_parser("schema", help="the event envelope's JSON schema")
    p.add_argument("--write", action="store_true", help="rewrite outbox/schemas/ instead")
    p.set_defaults(func=_cmd_schema)

    p = sub.add_parser("topics", help="what Kafka keeps of the topics: partitions, "
                       "replication, retention, whether a replay from offset 0 is complete")
    p.add_argument("--json", action="store_true", help="JSON instead of a table")
    p.add_argument("--create", action="append", default=[], metavar="AGGREGATE_TYPE",
                   type=_aggregate_type,
                   help="first create <prefix>.<AGGREGATE_TYPE> unless it exists, as the "
                        "relay would (repeatable; e.g. before processes that may not create "
                        "topics start)")
    p.set_defaults(func=_cmd_topics)

    from outbox.doctor.command import register as register_doctor

    register_doctor(sub)

    for ep in sorted(entry_points(group="outbox.commands"), key=lambda e: e.name):
        ep.load()(sub)
    return parser


def _fail(command: str, messages: list[str]) -> int:
    for message in messages:
        print(f"{command}: {message}", file=sys.stderr)
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `outbox` console script. A configuration problem (a setting
    missing or invalid, an unknown variable or file key, an unreadable file) stops the
    command at once with exit status 2 and one line per problem, naming the variable; so does
    a command or projector whose extra is not installed, naming the extra."""
    from outbox.extras import ExtraMissing
    from outbox.settings_registry import installed_classes, validation_messages

    args = build_parser().parse_args(argv)
    if args.config:
        os.environ[CONFIG_FILE_VARIABLE] = args.config
    name = getattr(args, "name", None)
    command = " ".join(["outbox", args.command, *([name] if isinstance(name, str) else [])])
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        if func is not _cmd_config:  # which reports the problems along with the values
            problems = _configuration_problems()
            if problems:
                return _fail(command, problems)
        return func(args)
    except (ConfigurationError, ExtraMissing) as exc:
        return _fail(command, [str(exc)])
    except ValidationError as exc:
        messages = validation_messages(exc, installed_classes())
        if messages is None:  # not a settings class's: a bug, with its traceback
            raise
        return _fail(command, messages)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
