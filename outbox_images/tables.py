"""The image domain's tables as SQLAlchemy Core objects (the DDL is in images/migrations/)."""

from __future__ import annotations

from sqlalchemy import Column, Index, MetaData, Table, func, text
from sqlalchemy.dialects.postgresql import DOUBLE_PRECISION, JSONB, UUID
from sqlalchemy.types import BigInteger, DateTime, Integer, Text

metadata = MetaData()

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
    Column("object_etag", Text),  # the verified object's: OCR reads that one or none
    Column("metadata", JSONB),
    Column("attempts", Integer, nullable=False, server_default=text("0")),
    # OCR attempts cut short with no result (a worker died or hung), not charged as attempts.
    Column("crashes", Integer, nullable=False, server_default=text("0")),
    Column("last_error", Text),
    Column("ocr", JSONB),
    Column("embedding", JSONB),
    Column("deadline_at", DateTime(timezone=True)),
    Column("state_entered_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("trace_id", Text),  # the W3C trace every event of the image continues
    Index("image_deadline_idx", "deadline_at", postgresql_where=text("deadline_at IS NOT NULL")),
    Index("image_org_listing_idx", "org_id", "created_at", "id"),
    Index("image_org_state_listing_idx", "org_id", "state", "created_at", "id"),
    Index("image_object_key_idx", "object_key"),
    Index("image_updated_at_idx", "updated_at", "id"),  # the continuous audit's changed rows
)

# The journey of each image: one row per event, written with it, kept after the outbox row
# is gone (the trace reads it).
image_event_table = Table(
    "image_event",
    metadata,
    Column("event_id", UUID(as_uuid=True), primary_key=True),
    Column("image_id", UUID(as_uuid=True), nullable=False),
    Column("org_id", Text, nullable=False),
    Column("version", BigInteger, nullable=False),
    Column("type", Text, nullable=False),
    Column("state", Text, nullable=False),
    Column("attempts", Integer, nullable=False),
    Column("last_error", Text),
    Column("traceparent", Text, nullable=False),
    Column("occurred_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Index("image_event_image_idx", "image_id", "version"),
)

result_cache_table = Table(
    "result_cache",
    metadata,
    Column("kind", Text, primary_key=True),
    Column("checksum", Text, primary_key=True),
    Column("engine", Text, primary_key=True),
    Column("result", JSONB, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
)

# Where the continuous audit stands, and its last pass's results (app/continuous_audit.py):
# one row, made by the migration, shared by every reconciler.
continuous_audit_table = Table(
    "continuous_audit",
    metadata,
    Column("name", Text, primary_key=True),
    Column("watermark_at", DateTime(timezone=True)),
    Column("watermark_id", UUID(as_uuid=True)),
    Column("slice_after", UUID(as_uuid=True)),
    Column("cycle_started_at", DateTime(timezone=True)),
    Column("last_cycle_s", DOUBLE_PRECISION),
    Column("last_pass_at", DateTime(timezone=True)),
    Column("last_pass_s", DOUBLE_PRECISION),
    Column("last_pass_rows", Integer, nullable=False, server_default=text("0")),
    Column("passes", BigInteger, nullable=False, server_default=text("0")),
    Column("open_drift", JSONB, nullable=False, server_default=text("'{}'")),
    Column("drift_passes", JSONB, nullable=False, server_default=text("'{}'")),
)
