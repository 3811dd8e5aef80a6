"""A worker's crash is not the image's fault (no server): the crash budget of `after_crash`,
and the OCR worker recognising an image that crashed before on its own."""

from __future__ import annotations

import threading
import time
import uuid
from datetime import UTC, datetime

from outbox.envelope import EventEnvelope
from outbox_app.settings import WorkerSettings
from outbox_app.workers.ocr import OcrWorker
from outbox_images.policy import ImageState, after_crash
from outbox_images.settings import ImageSettings

S = ImageState


def test_a_crash_gives_the_attempt_back_and_counts_a_crash():
    state, changes = after_crash(attempts=1, crashes=0, settings=ImageSettings(max_crashes=5))
    assert state is S.OCR_PENDING
    assert changes["attempts"] == 0 and changes["crashes"] == 1
    assert "crash 1 of 5" in changes["last_error"]


def test_the_image_fails_only_when_the_crash_budget_is_spent():
    settings = ImageSettings(max_attempts=3, max_crashes=5)
    # Two failed attempts of its own and four crashes: still another try.
    state, changes = after_crash(attempts=3, crashes=3, settings=settings)
    assert (state, changes["attempts"], changes["crashes"]) == (S.OCR_PENDING, 2, 4)
    state, changes = after_crash(attempts=3, crashes=4, settings=settings)
    assert (state, changes["crashes"]) == (S.OCR_FAILED, 5)
    assert changes["last_error"].startswith("crashed the OCR worker 5 times")


def test_crashes_never_spend_attempts():
    settings = ImageSettings(max_attempts=3, max_crashes=50)
    attempts, crashes = 0, 0
    for _ in range(49):
        attempts += 1  # the worker starts an attempt: ocr_pending -> ocr_running
        state, changes = after_crash(attempts, crashes, settings)
        attempts, crashes = changes["attempts"], changes["crashes"]
        assert state is S.OCR_PENDING
    assert (attempts, crashes) == (0, 49)


def _request(crashes: int) -> EventEnvelope:
    image_id = str(uuid.uuid4())
    return EventEnvelope(id=uuid.uuid4(), type="image.ocr_retry", aggregate_type="image",
                         aggregate_id=image_id, aggregate_version=3,
                         occurred_at=datetime.now(UTC),
                         payload={"id": image_id, "state": "ocr_pending", "version": 3,
                                  "attempts": 0, "crashes": crashes})


class RecordingOcrWorker(OcrWorker):
    """The OCR worker's scheduling with a recognition that only records which images were
    under way together (no database, bucket or engine)."""

    def __init__(self) -> None:
        super().__init__(WorkerSettings(ocr_concurrency=4), engine=None, s3=None)
        self._lock = threading.Lock()
        self.running: set[str] = set()
        self.beside: dict[str, set[str]] = {}

    def _apply_image(self, events: list[EventEnvelope]) -> None:
        image = events[0].aggregate_id
        with self._lock:
            self.running.add(image)
        time.sleep(0.05)
        with self._lock:
            self.beside[image] = set(self.running) - {image}
        time.sleep(0.05)
        with self._lock:
            self.running.discard(image)


def test_an_image_that_crashed_a_worker_is_recognised_alone():
    fresh = [_request(0) for _ in range(4)]
    crashed = [_request(1), _request(2)]
    worker = RecordingOcrWorker()
    try:
        worker.apply([crashed[0], *fresh[:2], crashed[1], *fresh[2:]])
    finally:
        worker.close()
    for event in crashed:
        assert worker.beside[event.aggregate_id] == set()
    # The others still run side by side.
    assert any(worker.beside[e.aggregate_id] for e in fresh)
    assert len(worker.beside) == 6
