"""One image's journey: every state change (with its time, event id, trace context and where
it sits in Kafka), what each view holds now, and the object in the bucket.

The history is the `image_event` table, written in the transaction of each change, so it
outlives the outbox janitor. An event's partition follows from its key (the relay's
producer partitions like the Java clients, murmur2); its offset is found on request by
reading that partition (bounded), since Tansu cannot look offsets up by time reliably.
"""

from __future__ import annotations

import uuid
from typing import Any

import redis
from botocore.client import BaseClient
from botocore.exceptions import ClientError
from confluent_kafka import KafkaException, TopicPartition
from elastic_transport import TransportError
from elasticsearch import Elasticsearch, NotFoundError
from kafka.partitioner.default import murmur2
from sqlalchemy import select
from sqlalchemy.engine import Engine

from outbox.kafka import make_reader
from outbox.wire_formats import event_topic, record_field
from outbox_app.settings import AppSettings
from outbox_app.views.task_cache import TaskCache
from outbox_images.store import AGGREGATE, ImageNotFound
from outbox_images.tables import image_event_table, image_table


def partition_for(key: str, partitions: int) -> int:
    """The partition the relay's producer puts `key` in: like the Java clients' default,
    the positive murmur2 of the key modulo the partition count."""
    return (murmur2(key.encode()) & 0x7FFFFFFF) % partitions


class ImageTrace:
    """Builds the journey of an image from the database, the views, the log and the bucket."""

    def __init__(self, settings: AppSettings, engine: Engine, es: Elasticsearch,
                 client: redis.Redis, s3: BaseClient) -> None:
        self._settings = settings
        self._engine = engine
        self._es = es
        self._tasks = TaskCache(settings, client)
        self._s3 = s3

    def journey(self, image_id: uuid.UUID, org: str | None = None,
                scan_kafka: int = 0) -> dict[str, Any]:
        """The journey of `image_id` (of `org`, when given: another org's image does not
        exist for the caller). `scan_kafka`: read up to that many messages of the image's
        partition to find each event's offset (0: do not read Kafka)."""
        t, h = image_table.c, image_event_table.c
        stmt = select(image_table).where(t.id == image_id)
        if org is not None:
            stmt = stmt.where(t.org_id == org)
        with self._engine.connect() as conn:
            row = conn.execute(stmt).mappings().one_or_none()
            if row is None:
                raise ImageNotFound(f"image {image_id} not found")
            events = conn.execute(select(image_event_table).where(h.image_id == image_id)
                                  .order_by(h.version, h.occurred_at)).mappings().all()
        topic = event_topic(self._settings, AGGREGATE)
        partition = self._partition(topic, str(image_id))
        offsets = self._offsets(topic, partition, {str(e["event_id"]) for e in events},
                                scan_kafka) if scan_kafka and partition is not None else {}
        return {
            "image": {"id": str(image_id), "org_id": row["org_id"], "state": row["state"],
                      "version": row["version"], "trace_id": row["trace_id"]},
            "history": [{
                "at": e["occurred_at"].isoformat(), "version": e["version"], "type": e["type"],
                "state": e["state"], "attempts": e["attempts"], "error": e["last_error"],
                "event_id": str(e["event_id"]), "traceparent": e["traceparent"],
                "kafka": {"topic": topic, "partition": partition,
                          "offset": offsets.get(str(e["event_id"]))},
            } for e in events],
            "views": {"search": self._search(str(image_id)),
                      "task_cache": self._cache(str(image_id))},
            "object": self._object(row["object_key"]),
        }

    def _partition(self, topic: str, key: str) -> int | None:
        try:
            consumer = make_reader(self._settings, "outbox-trace")
            try:
                parts = consumer.list_topics(topic, timeout=5).topics[topic].partitions
            finally:
                consumer.close()
        except (KafkaException, KeyError):
            return None
        return partition_for(key, len(parts)) if parts else None

    def _offsets(self, topic: str, partition: int, wanted: set[str], limit: int
                 ) -> dict[str, int]:
        consumer = make_reader(self._settings, "outbox-trace")
        found: dict[str, int] = {}
        try:
            low, _ = consumer.get_watermark_offsets(TopicPartition(topic, partition), timeout=5)
            consumer.assign([TopicPartition(topic, partition, low)])
            read = 0
            while read < limit and len(found) < len(wanted):
                batch = consumer.consume(500, timeout=1.0)
                if not batch:
                    break
                for msg in batch:
                    read += 1
                    if msg.error() is None:
                        event_id = record_field(msg.headers(), msg.value(), "id")
                        if event_id in wanted:
                            found[event_id] = msg.offset()
        finally:
            consumer.close()
        return found

    def _search(self, image_id: str) -> dict[str, Any]:
        try:
            got = self._es.get(index=self._settings.es_index, id=image_id,
                               source_includes=["state"])
        except NotFoundError:
            return {"holds": None}
        except TransportError as exc:
            return {"holds": None, "error": f"unreachable: {exc}"}
        return {"holds": int(got["_version"]), "state": got["_source"].get("state")}

    def _cache(self, image_id: str) -> dict[str, Any]:
        try:
            version = self._tasks.versions([image_id]).get(image_id)
            return {"holds": version, "steps": self._tasks.read(image_id)}
        except redis.RedisError as exc:
            return {"holds": None, "error": f"unreachable: {exc}"}

    def _object(self, key: str) -> dict[str, Any]:
        try:
            head = self._s3.head_object(Bucket=self._settings.s3_bucket, Key=key)
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code")
            return {"key": key, "exists": False if code in {"404", "NoSuchKey"} else None,
                    **({} if code in {"404", "NoSuchKey"} else {"error": str(exc)})}
        return {"key": key, "exists": True, "size": head["ContentLength"],
                "content_type": head.get("ContentType"), "etag": head.get("ETag"),
                "last_modified": head["LastModified"].isoformat()}
