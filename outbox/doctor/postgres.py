"""The doctor's PostgreSQL checks: the server, logical decoding, the connected role's
privileges for its purpose, the publication, the relay's slot and the migrations.

Facts are read once per connection; each check is a function of them, so the conditions a
real server cannot be brought into (an old major version) are tested on the facts alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import psycopg
from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy import make_url

from outbox.db import checked_schema, libpq_dsn
from outbox.doctor.findings import DoctorOptions, Finding, failed, passed, skipped, warned
from outbox.migrate import histories
from outbox.pg_names import OUTBOX_TABLE, publication_name, slot_name
from outbox.settings import Settings, get_settings

MIN_VERSION_NUM = 140000  # pgoutput's `messages` option, which the relay always asks for
MIGRATE_FIX = "run `outbox migrate` with the owner role's OUTBOX_DATABASE_URL"
GRANTS_FIX = ("as the owner, run the SQL that `outbox grants --app <app role> --relay "
              "<relay role>` prints")
REPLICATION_FIX = ("as a superuser: ALTER ROLE {role} REPLICATION (Amazon RDS: GRANT "
                   "rds_replication TO {role}; Cloud SQL: ALTER ROLE {role} REPLICATION as "
                   "cloudsqlsuperuser)")


@dataclass(frozen=True)
class ServerFacts:
    """What the checks need to know of the server and of the connected role."""

    version_num: int
    version: str
    wal_level: str
    max_replication_slots: int
    used_slots: int
    max_wal_senders: int
    used_wal_senders: int
    max_slot_wal_keep_size: str | None
    role: str
    superuser: bool
    replication: bool


SERVER_FACTS = """
select current_setting('server_version_num')::int, current_setting('server_version'),
       current_setting('wal_level'), current_setting('max_replication_slots')::int,
       (select count(*) from pg_replication_slots)::int,
       current_setting('max_wal_senders')::int,
       (select count(*) from pg_stat_replication)::int,
       current_setting('max_slot_wal_keep_size', true),
       current_user, r.rolsuper,
       r.rolreplication or r.rolsuper or coalesce(pg_has_role(current_user, m.oid, 'MEMBER'),
                                                  false)
from pg_roles r left join pg_roles m on m.rolname = 'rds_replication'
where r.rolname = current_user
"""


def where(settings: Settings) -> str:
    """The database URL without its password, for messages."""
    url = make_url(settings.database_url)
    return f"{url.username}@{url.host}:{url.port or 5432}/{url.database}"


def postgres_checks(options: DoctorOptions, settings: Settings | None = None) -> list[Finding]:
    """Every PostgreSQL check, in order; only the first when the server cannot be reached."""
    settings = settings or get_settings()
    schema = checked_schema(settings.db_schema)
    try:
        conn = psycopg.connect(libpq_dsn(settings), autocommit=True,
                               connect_timeout=max(1, round(options.timeout_s)))
    except psycopg.Error as exc:
        reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        return [failed("postgres.reachable", f"cannot connect to {where(settings)}: {reason}",
                       "OUTBOX_DATABASE_URL (host, port, database, user and password)")]
    with conn:
        facts = ServerFacts(*conn.execute(SERVER_FACTS).fetchone())
        found = [passed("postgres.reachable",
                        f"connected to {where(settings)} as {facts.role}"),
                 version_finding(facts)]
        if options.relay_mode == "logical":
            slot = conn.execute("select wal_status, active from pg_replication_slots"
                                " where slot_name = %s", (slot_name(schema),)).fetchone()
            found += [wal_level_finding(facts), capacity_finding(facts, slot),
                      wal_retention_finding(facts), slot_finding(schema, slot),
                      publication_finding(conn, schema)]
        else:
            found.append(skipped("postgres.logical_decoding",
                                 "the polling relay needs no wal_level, slot or publication"))
        found += [role_finding(conn, schema, facts, options), *migration_findings(conn, schema)]
    return found


def version_finding(facts: ServerFacts) -> Finding:
    """PostgreSQL 14 or later."""
    if facts.version_num >= MIN_VERSION_NUM:
        return passed("postgres.version", f"PostgreSQL {facts.version}")
    return failed("postgres.version",
                  f"PostgreSQL {facts.version}: the relay needs 14 or later (pgoutput's "
                  "`messages` option)", "upgrade the server to PostgreSQL 14 or later")


def wal_level_finding(facts: ServerFacts) -> Finding:
    """`wal_level = logical`, which logical decoding needs."""
    if facts.wal_level == "logical":
        return passed("postgres.wal_level", "wal_level = logical")
    return failed("postgres.wal_level",
                  f"wal_level = {facts.wal_level}: the logical relay needs logical",
                  "ALTER SYSTEM SET wal_level = logical, then restart the server (Amazon RDS: "
                  "rds.logical_replication = 1 in the parameter group; Cloud SQL: flag "
                  "cloudsql.logical_decoding = on); or use the polling relay "
                  "(`outbox relay --mode poll`, `outbox doctor --relay-mode poll`)")


def capacity_finding(facts: ServerFacts, slot: tuple | None) -> Finding:
    """A free replication slot (unless the relay's exists) and a free WAL sender (unless the
    relay is streaming now)."""
    need_slot = 0 if slot else 1
    need_sender = 0 if slot and slot[1] else 1
    free_slots = facts.max_replication_slots - facts.used_slots
    free_senders = facts.max_wal_senders - facts.used_wal_senders
    counts = (f"replication slots {facts.used_slots} of {facts.max_replication_slots} used, "
              f"WAL senders {facts.used_wal_senders} of {facts.max_wal_senders}")
    short = [what for what, free, need in (("replication slot", free_slots, need_slot),
                                            ("WAL sender", free_senders, need_sender))
             if free < need]
    if not short:
        return passed("postgres.replication_capacity", counts)
    return failed("postgres.replication_capacity",
                  f"{counts}: no free {' and no free '.join(short)} for the relay",
                  "raise max_replication_slots / max_wal_senders (server restart), or drop "
                  "slots nothing reads: SELECT pg_drop_replication_slot(slot_name) FROM "
                  "pg_replication_slots WHERE NOT active")


def wal_retention_finding(facts: ServerFacts) -> Finding:
    """`max_slot_wal_keep_size`: unbounded retention can fill the disk, a bound can invalidate
    the slot."""
    size = facts.max_slot_wal_keep_size
    if size is None:
        return skipped("postgres.max_slot_wal_keep_size", "not a setting of this server")
    if size == "-1":
        return warned("postgres.max_slot_wal_keep_size",
                      "max_slot_wal_keep_size = -1: a stopped or stuck relay's slot keeps "
                      "every WAL segment until the disk is full",
                      "ALTER SYSTEM SET max_slot_wal_keep_size = '<a size the disk can "
                      "spare, e.g. 50GB>'; SELECT pg_reload_conf(); and alert on the relay's "
                      "lag")
    return passed("postgres.max_slot_wal_keep_size",
                  f"max_slot_wal_keep_size = {size}: a slot further behind is invalidated; "
                  "the relay then recreates it with a backfill (transactions open longer "
                  "than OUTBOX_RELAY_BACKFILL_MARGIN_S could be missed)")


def slot_finding(schema: str, slot: tuple | None) -> Finding:
    """The relay's slot: made by the relay at its first start; invalidated is a failure."""
    name = slot_name(schema)
    if slot is None:
        return warned("postgres.slot", f"replication slot {name} does not exist yet",
                      "start the relay (`outbox relay`): it creates the slot, with a backfill")
    wal_status, active = slot
    if wal_status == "lost":
        return failed("postgres.slot",
                      f"replication slot {name} was invalidated (wal_status = lost): the "
                      "WAL it needed is gone",
                      "restart the relay: it recreates the slot with a backfill; then raise "
                      "max_slot_wal_keep_size or the relay's availability")
    return passed("postgres.slot", f"replication slot {name}: wal_status = {wal_status}, "
                  f"{'streaming' if active else 'not streaming now'}")


def publication_finding(conn: psycopg.Connection, schema: str) -> Finding:
    """The publication exists and publishes the outbox table's inserts."""
    name = publication_name(schema)
    table = f'"{schema}".{OUTBOX_TABLE}'
    row = conn.execute(
        "select p.pubinsert, p.puballtables, pr.oid is not null from pg_publication p"
        " left join pg_publication_rel pr on pr.prpubid = p.oid"
        " and pr.prrelid = to_regclass(%s) where p.pubname = %s", (table, name)).fetchone()
    fix = (f"{MIGRATE_FIX} (it creates the publication), or start the relay once as a role "
           "that owns the outbox table")
    if row is None:
        return failed("postgres.publication", f"publication {name} does not exist", fix)
    pubinsert, all_tables, has_table = row
    if not pubinsert or not (all_tables or has_table):
        return failed("postgres.publication",
                      f"publication {name} does not publish the inserts into {schema}.outbox",
                      f"as the owner: ALTER PUBLICATION \"{name}\" ADD TABLE {table}; ALTER "
                      f"PUBLICATION \"{name}\" SET (publish = 'insert')")
    return passed("postgres.publication", f"publication {name} publishes {schema}.outbox")


def _value(conn: psycopg.Connection, query: str, params: tuple) -> object:
    row = conn.execute(query, params).fetchone()
    return None if row is None else row[0]


def _lacking(conn: psycopg.Connection, table: str, wanted: tuple[str, ...]) -> list[str]:
    """`<privilege> on <table>` for each privilege of `wanted` the current role lacks."""
    return [f"{p} on {table}" for p in wanted
            if not _value(conn, "select has_table_privilege(%s, %s)", (table, p))]


def role_finding(conn: psycopg.Connection, schema: str, facts: ServerFacts,
                 options: DoctorOptions) -> Finding:
    """The connected role can do what `options.role` needs, and is no more than it needs: a
    long-running process (app, relay) should not own the schema's objects."""
    check = f"postgres.role.{options.role}"
    table = f'"{schema}".{OUTBOX_TABLE}'
    owns = conn.execute(
        "select pg_has_role(c.relowner, 'USAGE') from pg_class c"
        " where c.oid = to_regclass(%s)", (table,)).fetchone()
    if owns is None:
        return skipped(check, f"{schema}.outbox does not exist (see postgres.migrations)")
    owner = bool(owns[0])
    role = facts.role
    lacking: list[str] = []
    if not _value(conn, "select has_schema_privilege(%s, 'USAGE')", (schema,)):
        lacking.append(f"USAGE on schema {schema}")
    if options.role == "owner":
        if not owner:
            lacking.append(f"ownership of {schema}.outbox")
        if not _value(conn, "select has_schema_privilege(%s, 'CREATE')", (schema,)):
            lacking.append(f"CREATE on schema {schema}")
        fix = f"use the role that owns {schema}'s objects (the one `outbox migrate` ran as)"
    elif options.role == "relay":
        if not facts.replication:
            lacking.append("the REPLICATION attribute")
        # The janitor deletes published rows; the polling relay marks them published.
        lacking += _lacking(conn, table, ("SELECT", "DELETE") if options.relay_mode == "logical"
                            else ("SELECT", "UPDATE", "DELETE"))
        if options.relay_mode == "logical":
            lacking += _lacking(conn, f'"{schema}".relay_slot', ("SELECT", "INSERT", "UPDATE"))
        fix = (REPLICATION_FIX.format(role=role) + "; " + GRANTS_FIX
               if not facts.replication else GRANTS_FIX)
    else:
        emit = _value(
            conn, "select bool_or(has_function_privilege(p.oid, 'EXECUTE')) from pg_proc p"
            " join pg_namespace n on n.oid = p.pronamespace"
            " where n.nspname = %s and p.proname = 'outbox_emit'", (schema,))
        if not emit:
            lacking.append(f"EXECUTE on {schema}.outbox_emit")
        fix = GRANTS_FIX
    if lacking:
        return failed(check, f"role {role} lacks {', '.join(lacking)} (needed by the "
                      f"{options.role})", fix)
    if options.role != "owner" and (owner or facts.superuser):
        what = "a superuser" if facts.superuser else f"the owner of {schema}.outbox"
        return warned(check, f"role {role} is {what}: a long-running process should not be "
                      "able to change the schema or the publication",
                      f"give the {options.role} a role of its own: {GRANTS_FIX}")
    if options.role == "app" and facts.replication:
        return warned(check, f"role {role} has REPLICATION: it can read every change in the "
                      "database", f"as a superuser: ALTER ROLE {role} NOREPLICATION")
    return passed(check, f"role {role} has what the {options.role} needs")


def migration_findings(conn: psycopg.Connection, schema: str) -> list[Finding]:
    """Each migration history's version table is at its head."""
    found = []
    for history in histories():
        config = Config()
        config.set_main_option("script_location", str(history.location))
        heads = set(ScriptDirectory.from_config(config).get_heads())
        table = f'"{schema}".{history.version_table}'
        check = f"postgres.migrations.{history.name}"
        current: set[str] = set()
        if _value(conn, "select to_regclass(%s)", (table,)) is not None:
            if not _value(conn, "select has_table_privilege(%s, 'SELECT')", (table,)):
                found.append(skipped(check, f"this role may not read {table}: run `outbox "
                                     "doctor` with the owner's URL to check the migrations"))
                continue
            current = {r[0] for r in conn.execute(f"select version_num from {table}")}
        if current == heads:
            found.append(passed(check, f"{history.name} at head {', '.join(sorted(heads))}"))
        else:
            at = ", ".join(sorted(current)) or "nothing applied"
            found.append(failed(check, f"{history.name} in schema {schema}: {at}, head "
                                f"{', '.join(sorted(heads))}", MIGRATE_FIX))
    return found
