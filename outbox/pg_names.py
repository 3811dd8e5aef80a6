"""Names of the PostgreSQL objects the sidecar owns, derived from the outbox's schema.

One place, so the relays, the migrations' trigger, the CLI, the tests and the benchmark all
agree; several installations (one per schema) can share a database.
"""

from __future__ import annotations

OUTBOX_TABLE = "outbox"
# The one-row table of the settings the database must know itself (`emit_mode`, written by
# `outbox migrate`), so `outbox_emit` needs nothing from its caller.
CONFIG_TABLE = "outbox_config"


def slot_name(schema: str) -> str:
    """The logical replication slot of an outbox schema."""
    return f"outbox_{schema}"


def publication_name(schema: str) -> str:
    """The publication of an outbox schema (inserts into its outbox table only)."""
    return f"outbox_{schema}_pub"


def notify_channel(schema: str) -> str:
    """The LISTEN/NOTIFY channel the outbox trigger signals on commit (`outbox_notify()` in
    the first migration builds the same name from TG_TABLE_SCHEMA)."""
    return f"outbox_{schema}"


def relay_lock_name(schema: str) -> str:
    """The advisory lock that elects the one active relay of an outbox schema."""
    return f"outbox-relay:{schema}"


def message_prefix(schema: str) -> str:
    """The prefix of the logical-decoding messages `outbox_emit` writes in message mode.

    Logical messages are not filtered by publication: every slot of the database sees every
    message, so the prefix names the schema and each relay keeps only its own."""
    return f"outbox_emit:{schema}"

