"""An audit log of events, kept in a PostgreSQL database of its own.

Every event of the configured aggregate types becomes one row of `audit_log`, keyed by
event id: a redelivered event adds nothing. A lost connection to that database is an
outage the runtime waits out, with the partitions paused; `/readyz` probes the database.

Settings (environment): `AUDIT_LOG_DATABASE_URL` (a SQLAlchemy URL, required; or
`AUDIT_LOG_DATABASE_URL_FILE`, a file holding it), and `AUDIT_LOG_AGGREGATE_TYPES`
(comma-separated), plus the runtime's `OUTBOX_*` ones.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Annotated

import psycopg
import sqlalchemy.exc
from pydantic import AliasChoices, Field, field_validator
from pydantic_settings import SettingsConfigDict
from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    MetaData,
    Table,
    Text,
    create_engine,
    func,
)
from sqlalchemy.dialects.postgresql import JSONB, UUID, insert
from sqlalchemy.engine import make_url

from outbox.envelope import EventEnvelope
from outbox.readiness import Probe, postgres_probe
from outbox.settings_sources import SECRET
from projectors.settings import RuntimeSettings
from projectors.spec import ProjectorSpec, StopCheck

NAME = "audit-log"
AGGREGATE_TYPE = re.compile(r"[A-Za-z0-9._-]{1,200}")

metadata = MetaData()
audit_log = Table(
    "audit_log", metadata,
    Column("event_id", UUID(as_uuid=True), primary_key=True),
    Column("type", Text, nullable=False),
    Column("aggregate_type", Text, nullable=False),
    Column("aggregate_id", Text, nullable=False),
    Column("aggregate_version", BigInteger),
    Column("org_id", Text),
    Column("occurred_at", DateTime(timezone=True), nullable=False),
    Column("payload", JSONB, nullable=False),
    Column("recorded_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
)


class AuditLogSettings(RuntimeSettings):
    """The runtime's settings plus where the audit log lives and what it records."""

    model_config = SettingsConfigDict(populate_by_name=True)

    audit_log_database_url: Annotated[str, SECRET] = Field(
        description="SQLAlchemy URL of the audit log's database",
        validation_alias=AliasChoices("audit_log_database_url", "AUDIT_LOG_DATABASE_URL"))
    audit_log_aggregate_types: str = Field(
        default="image",
        validation_alias=AliasChoices("audit_log_aggregate_types", "AUDIT_LOG_AGGREGATE_TYPES"),
        description="comma-separated aggregate types whose events are recorded")

    @field_validator("audit_log_aggregate_types")
    @classmethod
    def _known_types(cls, value: str) -> str:
        types = [t.strip() for t in value.split(",") if t.strip()]
        bad = [t for t in types if not AGGREGATE_TYPE.fullmatch(t)]
        if not types or bad:
            raise ValueError(f"expected comma-separated aggregate types "
                             f"(A-Z a-z 0-9 . _ -), got {value!r}")
        return ",".join(types)

    @property
    def aggregate_types(self) -> tuple[str, ...]:
        """The aggregate types to read, one topic each."""
        return tuple(self.audit_log_aggregate_types.split(","))


class AuditLogProjector:
    """Writes each event once to `audit_log` (insert, ignoring an event id already there)."""

    name = NAME

    def __init__(self, settings: AuditLogSettings) -> None:
        self.aggregate_types = settings.aggregate_types
        self._engine = create_engine(settings.audit_log_database_url, pool_pre_ping=True)
        self._table_ready = False

    def apply(self, events: list[EventEnvelope]) -> None:
        """Record the batch in one transaction."""
        with self._engine.begin() as conn:
            if not self._table_ready:
                # Here rather than at set-up: a database down at start is waited out.
                metadata.create_all(conn)
                self._table_ready = True
            conn.execute(insert(audit_log).on_conflict_do_nothing(index_elements=["event_id"]),
                         [{"event_id": e.id, "type": e.type, "aggregate_type": e.aggregate_type,
                           "aggregate_id": e.aggregate_id,
                           "aggregate_version": e.aggregate_version, "org_id": e.org_id,
                           "occurred_at": e.occurred_at, "payload": e.payload}
                          for e in events])

    def close(self) -> None:
        """Close the database connections."""
        self._engine.dispose()


def is_lost_connection(exc: BaseException) -> bool:
    """The audit database is unreachable or dropped the connection: wait, do not
    dead-letter."""
    if isinstance(exc, sqlalchemy.exc.DBAPIError) and exc.connection_invalidated:
        return True
    return isinstance(exc, psycopg.OperationalError | sqlalchemy.exc.OperationalError)


def probes(settings: AuditLogSettings) -> Mapping[str, Probe]:
    """`/readyz`: the audit database answers `select 1`."""
    url = make_url(settings.audit_log_database_url).set(drivername="postgresql")
    return {"audit_database": postgres_probe(url.render_as_string(hide_password=False))}


def build(settings: AuditLogSettings, should_stop: StopCheck) -> AuditLogProjector:
    """Set the projector up (its batches are short: it does not check `should_stop`)."""
    return AuditLogProjector(settings)


SPEC = ProjectorSpec(name=NAME, metrics_port=9480, factory=build, settings=AuditLogSettings,
                     probes=probes, transient=is_lost_connection,
                     description="every event of the configured aggregate types, once, in "
                                 "another database's audit_log table")
