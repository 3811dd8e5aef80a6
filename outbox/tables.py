"""The sidecar's tables as SQLAlchemy Core objects, for queries (the DDL is in migrations/).

Tables carry no schema: the connection's search_path (see `outbox.db`) places them, so one
database can hold several isolated installations. `tests/test_migrations.py` checks that
these definitions and the migrated database agree.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    Identity,
    Index,
    MetaData,
    Table,
    Text,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB, UUID

metadata = MetaData()

outbox_table = Table(
    "outbox",
    metadata,
    Column("id", UUID(as_uuid=True), primary_key=True),
    Column("seq", BigInteger, Identity(always=True), nullable=False, unique=True),
    Column("aggregate_type", Text, nullable=False),
    Column("aggregate_id", Text, nullable=False),
    Column("type", Text, nullable=False),
    Column("aggregate_version", BigInteger),
    Column("org_id", Text),
    Column("payload", JSONB, nullable=False),
    Column("headers", JSONB, nullable=False, server_default=text("'{}'::jsonb")),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("published_at", DateTime(timezone=True)),
    Index("outbox_unpublished_idx", "seq", postgresql_where=text("published_at IS NULL")),
    Index(
        "outbox_published_at_idx",
        "published_at",
        postgresql_where=text("published_at IS NOT NULL"),
    ),
)

processed_event_table = Table(
    "processed_event",
    metadata,
    Column("consumer", Text, primary_key=True),
    Column("event_id", UUID(as_uuid=True), primary_key=True),
    Column("processed_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
)

relay_slot_table = Table(
    "relay_slot",
    metadata,
    Column("slot_name", Text, primary_key=True),
    Column("consistent_lsn", BigInteger, nullable=False),
    Column("backfilled_at", DateTime(timezone=True)),
    Column("acked_lsn", BigInteger, nullable=False),
    Column("acked_commit_at", DateTime(timezone=True)),
    Column("acked_seq", BigInteger, nullable=False, server_default=text("0")),
    Column("publication_fingerprint", Text, nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
)
