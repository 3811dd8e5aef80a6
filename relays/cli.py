"""`outbox relay`: publish the outbox to Kafka."""

from __future__ import annotations

import argparse
import sys

import psycopg

from outbox.cli import print_report, service_arguments


def _cmd_relay(args: argparse.Namespace) -> int:
    """Publish the outbox to Kafka until SIGTERM."""
    from outbox.observability import configure_logging, metrics_host
    from outbox.settings import get_settings
    from outbox.tracing import configure_tracing
    from relays.runner import serve_relay

    if args.mode == "poll" and (refusal := _poll_refusal()):
        print(f"outbox relay --mode poll: {refusal}", file=sys.stderr)
        return 2
    configure_logging(f"relay-{args.mode}", args.log_level)
    configure_tracing("outbox-relay", get_settings())
    return serve_relay(get_settings(), args.mode, metrics_host(args.metrics_host, get_settings()),
                       args.metrics_port)


def _poll_refusal() -> str | None:
    """Why the polling relay cannot serve this database (None: it can): it reads outbox
    rows, and message mode writes none."""
    from outbox.db import libpq_dsn
    from outbox.emit_mode import NO_ROWS_NOTE, stored_emit_mode
    from outbox.settings import get_settings

    try:
        with psycopg.connect(libpq_dsn(get_settings())) as conn:
            mode = stored_emit_mode(conn)
    except psycopg.OperationalError:
        return None  # the relay itself waits for the database and says so
    if mode != "message":
        return None
    return f"{NO_ROWS_NOTE}; the polling relay reads rows, so it has nothing to publish: " \
           "run the logical relay (`outbox relay`, the default mode)"


def _cmd_status(args: argparse.Namespace) -> int:
    """Print the slot, its lag and retained WAL, the publication's tables and the leader;
    exit 1 when something needs attention."""
    from outbox.settings import get_settings
    from relays.admin import relay_status

    try:
        status = relay_status(get_settings())
    except psycopg.errors.UndefinedTable:
        print("outbox relay status: the outbox tables do not exist in schema "
              f"{get_settings().db_schema!r} (run `outbox migrate`)", file=sys.stderr)
        return 2
    except psycopg.OperationalError as exc:
        print(f"outbox relay status: cannot reach the database: {exc}", file=sys.stderr)
        return 2
    print_report(status, args.json, _print_status)
    return 1 if status["problems"] else 0


def _print_status(status: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    slot, ack, waiting = status["slot"] or {}, status["acknowledged"] or {}, \
        status["unpublished_estimate"]
    leader = status["leader"]
    table = Table(title=f"relay of schema {status['schema']!r}", show_header=False)
    rows = [
        ("slot", slot.get("slot_name", "(none)")),
        ("wal status", slot.get("wal_status", "-")),
        ("confirmed / restart", f"{slot.get('confirmed_flush_lsn', '-')} / "
                                f"{slot.get('restart_lsn', '-')}"),
        ("lag (bytes)", str(slot.get("lag_bytes", "-"))),
        ("retained WAL (bytes)", str(slot.get("retained_wal_bytes", "-"))),
        ("publication", f"{status['publication']['name']}: "
                        f"{', '.join(status['publication']['tables']) or '(no tables)'}"),
        ("leader", "(none)" if leader is None else _leader(leader)),
        ("acknowledged", f"{ack.get('acked_lsn', '-')} (commit {ack.get('acked_commit_at')})"),
        ("delivery", _delivery(status["delivery"])),
        ("waiting (estimate)", "not counted: no outbox rows in message mode, see the "
                               "slot's lag" if status["estimate_note"] else
                               f"{waiting['rows']} rows, oldest {waiting['oldest_s'] or 0:.1f} s"),
    ]
    for name, value in rows:
        table.add_row(name, value)
    Console().print(table)
    for problem in status["problems"]:
        print(f"attention: {problem}")


def _delivery(delivery: dict) -> str:
    """The delivery mode, and exactly-once where Kafka's position is."""
    if delivery["mode"] != "exactly-once":
        return delivery["mode"]
    position = delivery["kafka_position"]
    if position is None:
        held = "nothing committed in Kafka yet"
    elif "error" in position:
        held = position["error"]
    else:
        parts = position["rows_of_a_transaction_in_parts"]
        held = f"Kafka holds up to {position['end_lsn']}" + (
            "" if parts is None else f", and {parts} rows of the transaction at "
            f"{position['commit_lsn']}")
    return f"exactly-once ({delivery['transactional_id']}): {held}"


def _leader(leader: dict) -> str:
    """The leader's session. Another role's session shows its pid only, unless the role
    reading it has pg_read_all_stats (PostgreSQL hides the rest)."""
    if leader["backend_start"] is None:
        return f"pid {leader['pid']} (details hidden: grant pg_read_all_stats to see them)"
    return (f"pid {leader['pid']} {leader['application_name'] or ''} "
            f"{leader['client_addr'] or 'local'} since "
            f"{leader['backend_start']:%Y-%m-%d %H:%M:%S}")


def _confirmed(args: argparse.Namespace) -> bool | None:
    """Whether the drop may go ahead: --yes, or "y" typed at the terminal's prompt; None
    when there is no terminal to ask and no --yes."""
    from outbox.pg_names import publication_name, slot_name
    from outbox.settings import get_settings

    if args.yes:
        return True
    if not sys.stdin.isatty():
        return None
    schema = get_settings().db_schema
    print(f"Drop the replication slot {slot_name(schema)!r} and the publication "
          f"{publication_name(schema)!r} of schema {schema!r}? What the slot still holds is "
          "published first. [y/N] ", end="", flush=True)
    # Not input(): end of input (Ctrl-D) is a no, not a traceback.
    return sys.stdin.readline().strip().lower() in ("y", "yes")


def _cmd_drop(args: argparse.Namespace) -> int:
    """Retire logical decoding for this outbox (slot, publication, record) safely, once
    confirmed."""
    from outbox.cli import print_fields
    from outbox.observability import configure_logging
    from outbox.settings import get_settings
    from relays.admin import RelayBusy, drop_relay

    confirmed = _confirmed(args)
    if confirmed is None:
        print("outbox relay drop: not dropped: no terminal to confirm on; pass --yes to drop "
              "the slot and the publication", file=sys.stderr)
        return 2
    if not confirmed:
        print("outbox relay drop: not confirmed; nothing dropped", file=sys.stderr)
        return 1
    configure_logging("relay-drop")  # JSON lines on stderr; the result goes to stdout

    try:
        done = drop_relay(get_settings())
    except RelayBusy as exc:
        print(f"outbox relay drop: {exc}", file=sys.stderr)
        return 1
    except psycopg.Error as exc:
        print(f"outbox relay drop: {exc}", file=sys.stderr)
        return 2
    print_report(done, args.json, print_fields)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add `relay` (and `relay status`, `relay drop`) to the `outbox` command line."""
    p = sub.add_parser("relay", help="publish the outbox to Kafka (one active per outbox)",
                       description="Without a subcommand: run the relay until SIGTERM.")
    p.add_argument("--mode", choices=["logical", "poll"], default="logical",
                   help="logical decoding (default) or polling for databases without it")
    service_arguments(p, metrics_port=9464)
    p.set_defaults(func=_cmd_relay)
    actions = p.add_subparsers(dest="action", metavar="ACTION")
    s = actions.add_parser("status", help="slot, lag, retained WAL, publication, leader "
                                          "(exit 1 when something needs attention)")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(func=_cmd_status)
    d = actions.add_parser("drop", help="retire the slot and publication without losing or "
                                        "repeating an event (stop the relays first)",
                           description="Asks for confirmation at a terminal; elsewhere (a "
                                       "script, a Job) it drops only with --yes, and exits 2 "
                                       "without it.")
    d.add_argument("--yes", action="store_true",
                   help="drop without asking (needed where there is no terminal)")
    d.add_argument("--json", action="store_true", help="machine-readable output")
    d.set_defaults(func=_cmd_drop)
