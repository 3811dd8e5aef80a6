"""The privileges of the process roles (`outbox grants`), generated as SQL.

Three roles: the owner's runs the migrations and owns every object (and the publication);
the application's writes its own tables and emits through `outbox_emit` (SECURITY DEFINER,
so it needs no privilege on the outbox table); the relay's reads the outbox, keeps its own
bookkeeping and has REPLICATION. Each migration history declares what the two process roles
need on its objects (`MigrationHistory.grants`), so the core names no package's tables.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from outbox.db import checked_schema


@dataclass(frozen=True)
class Grant:
    """Privileges on one object of the outbox schema, named without the schema: a table
    (`kind` TABLE) or a function with its argument types (`kind` FUNCTION)."""

    privileges: str
    kind: str
    name: str


def on_table(name: str, privileges: str) -> Grant:
    """`privileges` (e.g. "SELECT, INSERT", or "UPDATE (column)") on table `name`."""
    return Grant(privileges, "TABLE", name)


def on_function(signature: str) -> Grant:
    """EXECUTE on the function `signature` (its name and argument types)."""
    return Grant("EXECUTE", "FUNCTION", signature)


@dataclass(frozen=True)
class RoleGrants:
    """What the application's and the relay's roles need on one history's objects."""

    app: tuple[Grant, ...] = ()
    relay: tuple[Grant, ...] = ()


class GrantingHistory(Protocol):
    """A migration history as `grants_sql` reads it (`outbox.migrate.MigrationHistory`)."""

    name: str
    version_table: str
    grants: RoleGrants


def quote_ident(name: str) -> str:
    """`name` as a quoted SQL identifier (any role name is accepted)."""
    if not name or "\x00" in name:
        raise ValueError(f"invalid role name {name!r}")
    return '"' + name.replace('"', '""') + '"'


def _grant(grant: Grant, schema: str, role: str) -> str:
    if grant.kind == "FUNCTION":
        name, _, args = grant.name.partition("(")
        target = f'FUNCTION "{schema}".{quote_ident(name)}({args}'
    else:
        target = f'TABLE "{schema}".{quote_ident(grant.name)}'
    return f"GRANT {grant.privileges} ON {target} TO {role};"


def grants_sql(schema: str, app: str, relay: str, histories: Iterable[GrantingHistory],
               owner: str | None = None) -> str:
    """The SQL that gives `app` and `relay` what they need in `schema` for every history:
    idempotent (GRANT and ALTER DEFAULT PRIVILEGES are), schema-qualified, to be run by the
    schema's owner after each `outbox migrate`. REPLICATION is a comment: only a superuser
    (or a managed service's replication grant) can give it."""
    schema = checked_schema(schema)
    names = [app, relay, *([owner] if owner else [])]
    if len(set(names)) != len(names):
        raise ValueError("the application, relay and owner roles must be different roles "
                         f"(got {', '.join(names)}): one role would hold the others' rights")
    app_role, relay_role = quote_ident(app), quote_ident(relay)
    owner_role = quote_ident(owner) if owner else None
    lines = [
        f'-- outbox grants for schema "{schema}": application role {app_role}, relay role '
        f"{relay_role}.",
        "-- Idempotent; run it as the owner of the schema's objects"
        + (f" ({owner_role})" if owner_role else "") + " after every `outbox migrate`.",
        f'GRANT USAGE ON SCHEMA "{schema}" TO {app_role}, {relay_role};',
    ]
    for history in histories:
        lines.append(f"-- migration history {history.name}")
        version = on_table(history.version_table, "SELECT")
        lines += [_grant(g, schema, app_role) for g in (version, *history.grants.app)]
        lines += [_grant(g, schema, relay_role) for g in (version, *history.grants.relay)]
    lines += _default_privileges(schema, app_role, owner_role)
    lines += [
        "-- The relay's role needs the REPLICATION attribute for the logical relay (not for",
        "-- --mode poll). Only a superuser can give it, so it is printed as a comment: run it",
        "-- as one, or on RDS / Aurora `GRANT rds_replication TO <role>`, on Cloud SQL create",
        "-- the role as cloudsqlsuperuser with cloudsql.logical_decoding on and run it there.",
        f"-- ALTER ROLE {relay_role} WITH REPLICATION;",
    ]
    return "\n".join(lines) + "\n"


def _default_privileges(schema: str, app_role: str, owner_role: str | None) -> list[str]:
    """Tables and sequences a later migration creates in the schema are the application's
    (a package's new table works before the grants are run again); the relay's needs are
    fixed by the core and granted explicitly."""
    who = f"FOR ROLE {owner_role} " if owner_role else ""
    note = ("-- Default privileges: what a later migration by "
            + (owner_role or "the role running this") + " creates is the application's.")
    return [
        note,
        f'ALTER DEFAULT PRIVILEGES {who}IN SCHEMA "{schema}" GRANT SELECT, INSERT, UPDATE, '
        f"DELETE ON TABLES TO {app_role};",
        f'ALTER DEFAULT PRIVILEGES {who}IN SCHEMA "{schema}" GRANT USAGE, SELECT ON '
        f"SEQUENCES TO {app_role};",
    ]

