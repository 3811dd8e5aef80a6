"""The task cache: per image, the state of each step (ocr, embed, index) in a Redis hash.

A projection of the image events, so it can be flushed and rebuilt. Every write is a Lua
compare-and-set on the version it derives from, so a redelivered or older event changes
nothing. Entries of finished images expire after `task_ttl_s`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import redis

from outbox.envelope import EventEnvelope
from outbox_app.settings import ProjectorSettings
from outbox_images.policy import TERMINAL, ImageState

S = ImageState

# KEYS[1]: the hash; ARGV[1]: version field; ARGV[2]: version; ARGV[3]: ttl s (0: keep);
# ARGV[4..]: field, value pairs. Writes only when the stored version is older.
CAS_SCRIPT = """
local cur = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '-1')
if cur >= tonumber(ARGV[2]) then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2], unpack(ARGV, 4))
if tonumber(ARGV[3]) > 0 then redis.call('EXPIRE', KEYS[1], ARGV[3]) end
return 1
"""

STEPS = ("ocr", "embed", "index")
GENERATION_TTL_S = 1.0


def step_states(doc: dict[str, Any]) -> dict[str, str]:
    """The hash fields an image document implies (state, attempt, error of ocr and embed;
    the index step is written by the search projector once the view holds a version)."""
    state = doc["state"]
    attempt, error = str(doc.get("attempts") or 0), doc.get("last_error") or ""
    ocr = {
        S.OCR_PENDING: "queued", S.OCR_RUNNING: "running", S.OCR_FAILED: "failed",
        S.OCR_DONE: "succeeded", S.EMBEDDING_PENDING: "succeeded", S.EMBEDDED: "succeeded",
        S.EMBEDDING_FAILED: "succeeded",
    }.get(state)
    embed = {S.EMBEDDING_PENDING: "queued", S.EMBEDDED: "succeeded",
             S.EMBEDDING_FAILED: "failed"}.get(state)
    fields = {"state": state}
    if ocr:
        fields |= {"ocr_state": ocr, "ocr_attempt": attempt}
        if state in (S.OCR_FAILED, S.OCR_PENDING, S.OCR_RUNNING):
            fields["ocr_error"] = error
    if embed:
        fields["embed_state"] = embed
        if state == S.EMBEDDING_FAILED:
            fields["embed_error"] = error
    return fields


class TaskCache:
    """Reads and writes the task hashes."""

    def __init__(self, settings: ProjectorSettings, client: redis.Redis,
                 generation: int | None = None) -> None:
        """`generation`: a fixed key generation (a rebuild's); None follows the live one,
        named by the pointer key `<prefix>:task-generation`."""
        self._redis = client
        self._prefix = settings.redis_prefix
        self._ttl = settings.task_ttl_s
        self._cas = client.register_script(CAS_SCRIPT)
        self._fixed = generation
        self._cached: tuple[float, int] = (0.0, 0)
        self.generation_key = f"{self._prefix}:task-generation"
        self.building_key = f"{self._prefix}:task-generation-building"
        # Written when the cache is born and by each rebuild, never by the projectors, so
        # its absence says Redis lost the cache (`outbox_app.view_healing`).
        self.marker_key = f"{self._prefix}:task-cache-marker"

    def generation(self) -> int:
        """The key generation in use (0 before any rebuild); the live pointer is read at
        most once a second."""
        if self._fixed is not None:
            return self._fixed
        at, gen = self._cached
        if time.monotonic() - at > GENERATION_TTL_S:
            gen = int(self._redis.get(self.generation_key) or 0)
            self._cached = (time.monotonic(), gen)
        return gen

    def _key_prefix(self, generation: int) -> str:
        return f"{self._prefix}:task:" if generation == 0 else f"{self._prefix}:task:g{generation}:"

    def key(self, image_id: str) -> str:
        """The hash of one image, in the current generation."""
        return self._key_prefix(self.generation()) + image_id

    def copy_index_fields(self, target: TaskCache) -> int:
        """Copy the `index_*` fields (written by the search projector, not derived from the
        events) of every entry into `target`'s generation; return how many."""
        prefix, copied = self._key_prefix(self.generation()), 0
        for key in self._redis.scan_iter(f"{prefix}*", count=1000):
            image_id = key.decode()[len(prefix):]
            if ":" in image_id:  # another generation's key
                continue
            fields = self._redis.hmget(key, "index_version", "index_state", "index_updated_at")
            if fields[0] is not None:
                target._write(image_id, "index_version", int(fields[0]), 0,
                              {"index_state": fields[1].decode(),
                               "index_updated_at": fields[2].decode()})
                copied += 1
        return copied

    def delete_all(self) -> int:
        """Remove every key of this generation; return how many."""
        prefix, deleted = self._key_prefix(self.generation()), 0
        for key in self._redis.scan_iter(f"{prefix}*", count=1000):
            if ":" not in key.decode()[len(prefix):]:
                deleted += self._redis.unlink(key)
        return deleted

    def apply_event(self, e: EventEnvelope) -> bool:
        """Write the step states the event's document implies, if newer."""
        doc = e.payload
        fields = step_states(doc)
        for step in ("ocr", "embed"):
            if f"{step}_state" in fields:
                fields[f"{step}_updated_at"] = e.occurred_at.isoformat()
        return self._write(e.aggregate_id, "version", e.aggregate_version or 0,
                           self._ttl_for(e), fields)

    def mark_indexed(self, e: EventEnvelope) -> bool:
        """The search view holds this version (written by the search projector)."""
        return self._write(e.aggregate_id, "index_version", e.aggregate_version or 0,
                           self._ttl_for(e), {"index_state": "succeeded",
                                              "index_updated_at": e.occurred_at.isoformat()})

    def _ttl_for(self, e: EventEnvelope) -> int:
        """Entries of finished images expire (whichever projector writes them last, and
        also when a replay re-creates them); 0 keeps the current expiry."""
        state = e.payload.get("state")
        return self._ttl if state in TERMINAL or state == S.EMBEDDED else 0

    def _write(self, image_id: str, version_field: str, version: int, ttl: int,
               fields: dict[str, str]) -> bool:
        flat: list[str] = [x for kv in fields.items() for x in kv]
        return bool(self._cas(keys=[self.key(image_id)],
                              args=[version_field, version, ttl, *flat]))

    def versions(self, image_ids: list[str]) -> dict[str, int]:
        """The version each image's entry derives from (absent: no entry), in one round
        trip."""
        pipe = self._redis.pipeline(transaction=False)
        for image_id in image_ids:
            pipe.hget(self.key(image_id), "version")
        return {i: int(v) for i, v in zip(image_ids, pipe.execute(), strict=True)
                if v is not None}

    def read(self, image_id: str) -> dict[str, dict[str, str]]:
        """The steps of an image: {step: {state, attempt, error, updated_at}}."""
        raw = {k.decode(): v.decode() for k, v in self._redis.hgetall(self.key(image_id)).items()}
        out: dict[str, dict[str, str]] = {}
        for step in STEPS:
            if f"{step}_state" in raw:
                out[step] = {f: raw[f"{step}_{f}"] for f in ("state", "attempt", "error",
                                                            "updated_at") if f"{step}_{f}" in raw}
        return out


class TaskCacheProjector:
    """Projector `cache`."""

    name = "cache"
    aggregate_types: Sequence[str] = ("image",)

    def __init__(self, tasks: TaskCache, client: redis.Redis) -> None:
        self._tasks = tasks
        self._client = client

    def apply(self, events: list[EventEnvelope]) -> None:
        """Each event is a version-guarded write; order within the batch does not matter."""
        for e in events:
            self._tasks.apply_event(e)

    def close(self) -> None:
        """Close the Redis connection pool."""
        self._client.close()
