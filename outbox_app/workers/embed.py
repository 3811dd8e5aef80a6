"""The embedding worker: `embedding_pending` -> vector -> `embedded`, through the outbox.

Texts of a batch are embedded in one model call; results are cached by text checksum and
model version, so a replay or an identical image never runs the model again. A text the
model fails on (alone, not just within the batch) ends its image in `embedding_failed` with
the error; an outage (see `store_errors`) is raised for the runtime to wait out."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import structlog
from sqlalchemy.engine import Connection, Engine

from outbox.envelope import EventEnvelope
from outbox.tracking import claim_event
from outbox_app.store_errors import is_outage
from outbox_app.workers.embedder import Embedder
from outbox_app.workers.result_cache import cached_results, store_results
from outbox_images.policy import ImageState
from outbox_images.settings import ImageSettings
from outbox_images.store import lock_at_version, transition
from projectors.apply_spans import applying

log = structlog.get_logger(__name__)
S = ImageState


def embedding_text(document: dict[str, Any]) -> str:
    """What the vector represents: title, description, tags and the OCR text."""
    meta = document.get("metadata") or {}
    ocr = document.get("ocr") or {}
    parts = [meta.get("title"), meta.get("description"), " ".join(meta.get("tags") or []),
             ocr.get("text")]
    return "\n".join(p for p in parts if p)


class EmbeddingWorker:
    """Projector `embed`."""

    name = "embed"
    aggregate_types: Sequence[str] = ("image",)

    def __init__(self, settings: ImageSettings, engine: Engine, embedder: Embedder) -> None:
        self._settings = settings
        self._engine = engine
        self._embedder = embedder

    def apply(self, events: list[EventEnvelope]) -> None:
        """Embed every image of the batch that waits in `embedding_pending`."""
        pending = [e for e in events if e.payload.get("state") == S.EMBEDDING_PENDING]
        if not pending:
            return
        texts = {e.id: embedding_text(e.payload) for e in pending}
        vectors, errors, fresh = self._vectors(list(set(texts.values())))
        # One transaction for the batch, its new cache entries included: a commit per image
        # cost more than the model. If it fails, the runtime retries the whole batch; the
        # claims make that harmless.
        with self._engine.begin() as conn:
            store_results(conn, "embedding", self._embedder.model_id, fresh)
            for event in pending:
                with applying(event):  # its result continues the event's trace
                    self._record(conn, event, texts[event.id], vectors, errors)

    def _record(self, conn: Connection, event: EventEnvelope, text: str,
                vectors: dict[str, list[float]], errors: dict[str, str]) -> None:
        """The event's outcome: `embedded` with the vector, or `embedding_failed`."""
        if not claim_event(conn, self.name, event.id):
            return
        row = lock_at_version(conn, event.aggregate_id, S.EMBEDDING_PENDING,
                              event.aggregate_version)
        if row is None:
            return
        if text in errors:
            transition(conn, row, S.EMBEDDING_FAILED, self._settings,
                       {"last_error": errors[text][:1000]})
            log.warning("embedding_failed", image=event.aggregate_id, error=errors[text][:200])
            return
        transition(conn, row, S.EMBEDDED, self._settings, {"embedding": {
            "model": self._embedder.model_id, "dim": self._embedder.dim,
            "vector": vectors[text]}})

    def _embed(self, texts: list[str]) -> tuple[list[tuple[str, Any]], dict[str, str]]:
        """(text, vector) pairs and {text: error}: the batch in one call, or, when that
        fails for a reason other than an outage, each text alone."""
        try:
            return list(zip(texts, self._embedder.passages(texts), strict=True)), {}
        except Exception as exc:
            if is_outage(exc):
                raise
            log.warning("embedding_batch_failed", texts=len(texts), error=str(exc)[:200])
        done: list[tuple[str, Any]] = []
        errors: dict[str, str] = {}
        for text in texts:
            try:
                done.append((text, self._embedder.passages([text])[0]))
            except Exception as exc:
                if is_outage(exc):
                    raise
                errors[text] = f"{type(exc).__name__}: {exc}"
        return done, errors

    def _vectors(self, texts: list[str]
                 ) -> tuple[dict[str, list[float]], dict[str, str], dict[str, list[float]]]:
        """Vectors and errors by text, and the new vectors by checksum (to be cached)."""
        model = self._embedder.model_id
        keys = {t: hashlib.sha256(t.encode()).hexdigest() for t in texts}
        with self._engine.connect() as conn:
            hits = cached_results(conn, "embedding", list(keys.values()), model)
        out = {t: hits[k] for t, k in keys.items() if k in hits}
        missing = [t for t in texts if t not in out]
        errors: dict[str, str] = {}
        fresh: dict[str, list[float]] = {}
        if missing:
            done, errors = self._embed(missing)
            for text, vec in done:
                out[text] = fresh[keys[text]] = [round(float(x), 6) for x in vec]
            log.info("embedded", texts=len(done), cached=len(texts) - len(missing),
                     failed=len(errors))
        return out, errors, fresh

    def close(self) -> None:
        """Nothing held beyond the shared engine."""
