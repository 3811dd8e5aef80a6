"""Tables: the outbox, the image resource and the consumers' tracking records.

Tables carry no schema: the connection's search_path (see `outbox.db`) places them, so one
database can hold several isolated installations.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    Identity,
    Index,
    Integer,
    MetaData,
    Table,
    Text,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB, UUID

metadata = MetaData()

# Column names follow Debezium's outbox event router (id, aggregatetype/aggregateid, type,
# payload) in snake case; `seq` and `published_at` serve the polling relay.
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

image_table = Table(
    "image",
    metadata,
    Column("id", UUID(as_uuid=True), primary_key=True),
    Column("org_id", Text, nullable=False),
    Column("state", Text, nullable=False),
    Column("version", BigInteger, nullable=False),
    Column("filename", Text, nullable=False),
    Column("content_type", Text, nullable=False),
    Column("declared_size", BigInteger, nullable=False),
    Column("checksum_sha256", Text),
    Column("object_key", Text, nullable=False),
    Column("object_size", BigInteger),
    Column("metadata", JSONB),
    Column("attempts", Integer, nullable=False, server_default=text("0")),
    Column("last_error", Text),
    Column("ocr", JSONB),
    Column("embedding", JSONB),
    Column("deadline_at", DateTime(timezone=True)),
    Column("state_entered_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    # The reconciler reads only what is due: work proportional to that, not to the table.
    Index("image_deadline_idx", "deadline_at", postgresql_where=text("deadline_at IS NOT NULL")),
    Index("image_org_listing_idx", "org_id", "created_at", "id"),
    Index("image_org_state_listing_idx", "org_id", "state", "created_at", "id"),
)

# A DB-writing consumer records (consumer, event id) in the transaction of its result, so a
# redelivered event has no second effect.
processed_event_table = Table(
    "processed_event",
    metadata,
    Column("consumer", Text, primary_key=True),
    Column("event_id", UUID(as_uuid=True), primary_key=True),
    Column("processed_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
)

# OCR and embedding results by (kind, content checksum, engine/model version): an identical
# image or text, or a replay, never redoes the work.
result_cache_table = Table(
    "result_cache",
    metadata,
    Column("kind", Text, primary_key=True),
    Column("checksum", Text, primary_key=True),
    Column("engine", Text, primary_key=True),
    Column("result", JSONB, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
)
