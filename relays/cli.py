"""`outbox relay`: publish the outbox to Kafka."""

from __future__ import annotations

import argparse

from outbox.cli import service_arguments


def _cmd_relay(args: argparse.Namespace) -> int:
    """Publish the outbox to Kafka until SIGTERM."""
    from outbox.observability import configure_logging
    from outbox.settings import get_settings
    from relays.runner import serve_relay

    configure_logging(f"relay-{args.mode}", args.log_level)
    return serve_relay(get_settings(), args.mode, args.metrics_host, args.metrics_port)


def register(sub: argparse._SubParsersAction) -> None:
    """Add `relay` to the `outbox` command line."""
    p = sub.add_parser("relay", help="publish the outbox to Kafka (one active per outbox)")
    p.add_argument("--mode", choices=["logical", "poll"], default="logical",
                   help="logical decoding (default) or polling for databases without it")
    service_arguments(p, metrics_port=9464)
    p.set_defaults(func=_cmd_relay)
