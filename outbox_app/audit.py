"""`outbox audit`: does every store agree with the database, and if not, heal it.

The database is the truth. The audit walks it in keyset ranges and compares each range with
the search view (one multi-get), the task cache (one pipeline) and the bucket (a listing
merged with the rows by object key), so memory stays bounded by the range, whatever the
table holds. Then it scans the view for documents without a row.

Findings, each with the image it is about:
- `view_missing`, `view_stale`, `view_orphan` (the view holds a deleted image, or one with
  no row at all);
- `cache_missing`, `cache_stale` (the task cache's hash);
- `log_gap`: the topic no longer holds any event of the image (retention deleted them), so a
  rebuild from the log would miss it;
- `object_orphan` (an object with no row, or whose row is in a state that removed it, older
  than the grace period), `object_missing` (the row still needs its object for OCR).

Rows changed within the grace period are not judged: their events may still be on the way.
`--repair` heals through the normal paths: drift of a view is an `image.resynced` event with
the current document (so the log stays the only source of the views), an orphan object is
deleted, a missing object moves its image to `ocr_failed` with the reason.
"""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import redis
import structlog
from botocore.client import BaseClient
from confluent_kafka import TopicPartition
from elasticsearch import Elasticsearch, NotFoundError, helpers
from sqlalchemy import select
from sqlalchemy.engine import Engine

from outbox.emit import emit
from outbox.kafka import make_reader
from outbox.wire_formats import event_topic
from outbox_app.settings import AppSettings
from outbox_app.trace import partition_for
from outbox_app.views.task_cache import TaskCache
from outbox_images.policy import NEEDS_OBJECT, OBJECT_GONE, TERMINAL, ImageState
from outbox_images.store import AGGREGATE, ImageNotFound, load_image, resync, transition
from outbox_images.tables import image_table

log = structlog.get_logger(__name__)

# Healed by a resync event (for a log gap: the new event is back in the log).
VIEW_KINDS = ("view_missing", "view_stale", "view_orphan", "cache_missing", "cache_stale",
              "log_gap")


def log_floor(settings: AppSettings) -> tuple[int, dict[int, datetime]]:
    """The partition count of the image topic, and for each partition whose oldest events
    were deleted, the time of the oldest event it still holds."""
    topic = event_topic(settings, AGGREGATE)
    consumer = make_reader(settings, f"{topic}.audit")
    floors: dict[int, datetime] = {}
    try:
        meta = consumer.list_topics(topic, timeout=10).topics.get(topic)
        if meta is None or meta.error is not None:
            return 0, floors
        for p in meta.partitions:
            low, _ = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
            if low > 0:
                consumer.assign([TopicPartition(topic, p, low)])
                first = consumer.consume(1, timeout=5)
                if first and first[0].error() is None:
                    floors[p] = datetime.fromtimestamp(first[0].timestamp()[1] / 1000, UTC)
        return len(meta.partitions), floors
    finally:
        consumer.close()


@dataclass(frozen=True)
class Finding:
    """One disagreement between the database and another store."""

    kind: str
    image_id: str
    org_id: str | None
    detail: str
    object_key: str | None = None  # object findings: the key in the bucket
    held_version: int | None = None  # view findings: the version the view holds


class AuditIncomplete(RuntimeError):
    """A store could not be read to the end: the audit says nothing about what it missed."""


class Auditor:
    """Compares the database with the search view, the task cache and the bucket."""

    def __init__(self, settings: AppSettings, engine: Engine, es: Elasticsearch,
                 client: redis.Redis, s3: BaseClient, *, org: str | None = None,
                 grace_s: float = 60.0, batch: int = 500) -> None:
        self._settings = settings
        self._engine = engine
        self._es = es
        self._redis = client
        self._tasks = TaskCache(settings, client)
        self._s3 = s3
        self._org = org
        self._grace = timedelta(seconds=grace_s)
        self._batch = batch
        self.rows_read = 0

    def findings(self) -> Iterator[Finding]:
        """Every disagreement, range by range."""
        # The bucket first: repairing its findings changes rows, which the view pass then
        # leaves alone as recently changed (their new events are on the way).
        yield from self._guarded(self._bucket_against_rows, self._rows_against_views,
                                 self._view_without_rows)

    def view_findings(self) -> Iterator[Finding]:
        """The search view's disagreements only (a rebuilt index is verified so)."""
        for f in self._guarded(self._rows_against_views, self._view_without_rows):
            if f.kind.startswith("view_"):
                yield f

    def _guarded(self, *parts: Callable[[], Iterator[Finding]]) -> Iterator[Finding]:
        self._now = datetime.now(UTC)
        try:
            for part in parts:
                yield from part()
        except AuditIncomplete:
            raise
        except Exception as exc:
            raise AuditIncomplete(f"{type(exc).__name__}: {exc}") from exc

    def _settled(self, changed_at: datetime) -> bool:
        return changed_at < self._now - self._grace

    def _rows(self, order: Any, columns: list[Any]) -> Iterator[list[Any]]:
        """The image rows (of the org, if one was given) in keyset ranges by `order`."""
        t = image_table.c
        last = None
        while True:
            stmt = select(*columns).order_by(order).limit(self._batch)
            if self._org is not None:
                stmt = stmt.where(t.org_id == self._org)
            if last is not None:
                stmt = stmt.where(order > last)
            with self._engine.connect() as conn:
                rows = conn.execute(stmt).all()
            if not rows:
                return
            yield rows
            last = getattr(rows[-1], order.name)

    def row_findings(self, rows: Sequence[Any]) -> Iterator[Finding]:
        """The view, task-cache and log findings of these image rows only (each with id,
        org_id, state, version and updated_at), in ranges of `batch`: the continuous
        audit's pass."""
        ranges = (rows[i:i + self._batch] for i in range(0, len(rows), self._batch))
        return self._guarded(lambda: self._judge_rows(ranges))

    def _rows_against_views(self) -> Iterator[Finding]:
        t = image_table.c
        cols = [t.id, t.org_id, t.state, t.version, t.updated_at]
        yield from self._judge_rows(self._rows(t.id, cols))

    def _judge_rows(self, ranges: Iterable[Sequence[Any]]) -> Iterator[Finding]:
        partitions, floors = log_floor(self._settings)
        for rows in ranges:
            self.rows_read += len(rows)
            ids = [str(r.id) for r in rows]
            try:
                docs = self._es.mget(index=self._settings.es_index, ids=ids,
                                     source=False)["docs"]
            except NotFoundError as exc:
                raise AuditIncomplete("the search view does not exist") from exc
            indexed = {d["_id"]: d["_version"] for d in docs if d.get("found")}
            cached = self._tasks.versions(ids)
            for r, image_id in zip(rows, ids, strict=True):
                if not self._settled(r.updated_at):
                    continue
                yield from self._compare(r, image_id, indexed.get(image_id),
                                         cached.get(image_id))
                floor = floors.get(partition_for(image_id, partitions)) if floors else None
                if floor is not None and r.updated_at < floor:
                    yield Finding("log_gap", image_id, r.org_id, "the topic no longer holds "
                                  f"any event of it (oldest kept: {floor.isoformat()})")

    def _compare(self, r: Any, image_id: str, in_view: int | None, in_cache: int | None
                 ) -> Iterator[Finding]:
        if r.state == ImageState.DELETED:
            if in_view is not None:
                yield Finding("view_orphan", image_id, r.org_id,
                              f"deleted image still in the view at version {in_view}",
                              held_version=in_view)
        elif in_view is None:
            yield Finding("view_missing", image_id, r.org_id,
                          f"not in the view (database version {r.version})")
        elif in_view < r.version:
            yield Finding("view_stale", image_id, r.org_id,
                          f"view holds version {in_view}, database {r.version}")
        # Entries of finished images expire after task_ttl_s: only a live one must be there.
        expired_ok = (r.state in TERMINAL or r.state == ImageState.EMBEDDED) and \
            r.updated_at < self._now - timedelta(seconds=self._settings.task_ttl_s)
        if in_cache is None and not expired_ok:
            yield Finding("cache_missing", image_id, r.org_id, "no task-cache entry")
        elif in_cache is not None and in_cache < r.version:
            yield Finding("cache_stale", image_id, r.org_id,
                          f"task cache at version {in_cache}, database {r.version}")

    def _view_without_rows(self) -> Iterator[Finding]:
        query: dict[str, Any] = {"match_all": {}}
        if self._org is not None:
            query = {"term": {"org_id": self._org}}
        hits = helpers.scan(self._es, index=self._settings.es_index, query={"query": query},
                            _source=["org_id"], size=self._batch, version=True)
        page: list[dict[str, Any]] = []
        for hit in hits:
            page.append(hit)
            if len(page) >= self._batch:
                yield from self._orphans(page)
                page = []
        yield from self._orphans(page)

    def _orphans(self, hits: list[dict[str, Any]]) -> Iterator[Finding]:
        if not hits:
            return
        ids = {h["_id"]: _as_uuid(h["_id"]) for h in hits}
        with self._engine.connect() as conn:
            known = set(conn.execute(select(image_table.c.id).where(
                image_table.c.id.in_([i for i in ids.values() if i]))).scalars())
        for h in hits:
            if ids[h["_id"]] not in known:
                yield Finding("view_orphan", h["_id"], h["_source"].get("org_id"),
                              f"in the view at version {h.get('_version')} with no row",
                              held_version=h.get("_version"))

    def _bucket_against_rows(self) -> Iterator[Finding]:
        """Merge the bucket's listing with the rows, both ordered by object key."""
        t = image_table.c
        prefix = "orgs/" if self._org is None else f"orgs/{self._org}/"
        objects = self._listing(prefix)
        obj = next(objects, None)
        cols = [t.object_key, t.id, t.org_id, t.state, t.updated_at]
        for rows in self._rows(t.object_key, cols):
            for r in rows:
                while obj is not None and obj["Key"] < r.object_key:
                    yield from self._orphan_object(obj, None)
                    obj = next(objects, None)
                if obj is not None and obj["Key"] == r.object_key:
                    yield from self._orphan_object(obj, r)
                    obj = next(objects, None)
                elif r.state in NEEDS_OBJECT and self._settled(r.updated_at):
                    yield Finding("object_missing", str(r.id), r.org_id,
                                  f"no object while {r.state}", object_key=r.object_key)
        while obj is not None:
            yield from self._orphan_object(obj, None)
            obj = next(objects, None)

    def _listing(self, prefix: str) -> Iterator[dict[str, Any]]:
        pages = self._s3.get_paginator("list_objects_v2").paginate(
            Bucket=self._settings.s3_bucket, Prefix=prefix,
            PaginationConfig={"PageSize": self._batch})
        for page in pages:
            yield from page.get("Contents", [])

    def _orphan_object(self, obj: dict[str, Any], row: Any) -> Iterator[Finding]:
        if not self._settled(obj["LastModified"]):
            return
        if row is None:
            yield Finding("object_orphan", obj["Key"].rsplit("/", 1)[-1], None,
                          "object with no row", object_key=obj["Key"])
        elif row.state in OBJECT_GONE and self._settled(row.updated_at):
            yield Finding("object_orphan", str(row.id), row.org_id,
                          f"object kept although the image is {row.state}",
                          object_key=obj["Key"])


def _as_uuid(value: str) -> uuid.UUID | None:
    try:
        return uuid.UUID(value)
    except ValueError:
        return None


class Repairer:
    """Heals findings through the normal paths (see the module doc)."""

    def __init__(self, settings: AppSettings, engine: Engine, s3: BaseClient) -> None:
        self._settings = settings
        self._engine = engine
        self._s3 = s3
        self.done: Counter[str] = Counter()
        self._resynced: set[str] = set()

    def repair(self, f: Finding) -> None:
        """Heal one finding (once per image for view drift)."""
        if f.kind in VIEW_KINDS:
            if f.image_id not in self._resynced:
                self._resynced.add(f.image_id)
                self._resync(f)
        elif f.kind == "object_orphan":
            self._s3.delete_object(Bucket=self._settings.s3_bucket, Key=f.object_key)
            self.done["object_deleted"] += 1
        elif f.kind == "object_missing":
            with self._engine.begin() as conn:
                row = load_image(conn, f.org_id or "", uuid.UUID(f.image_id), for_update=True)
                if row["state"] in NEEDS_OBJECT:  # still: it may have moved on meanwhile
                    transition(conn, row, ImageState.OCR_FAILED, self._settings,
                               {"last_error": "the uploaded object is missing from the bucket"})
                    self.done["failed_missing_object"] += 1

    def _resync(self, f: Finding) -> None:
        with self._engine.begin() as conn:
            try:
                row = load_image(conn, f.org_id or "", uuid.UUID(f.image_id), for_update=True)
            except (ImageNotFound, ValueError):
                row = None
            if row is not None:
                resync(conn, row)
                self.done["resynced"] += 1
                return
            # No row at all: a tombstone newer than what the view holds removes it.
            held = f.held_version or 0
            emit(conn, aggregate_type=AGGREGATE, aggregate_id=f.image_id,
                 type="image.resynced", aggregate_version=held + 1, org_id=f.org_id,
                 payload={"id": f.image_id, "org_id": f.org_id, "state": "deleted",
                          "version": held + 1})
            self.done["tombstoned"] += 1


def finding_dict(f: Finding) -> dict[str, Any]:
    """A finding as JSON-ready data."""
    return asdict(f)
