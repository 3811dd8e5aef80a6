"""The OCR worker against the real PostgreSQL and S3, with interleavings the pipeline's
timing makes rare: a metadata edit while OCR runs, a stop in the middle of a batch, and
recognitions side by side."""

from __future__ import annotations

import threading

import pytest

from outbox_app.sample_images import text_image
from outbox_app.workers.ocr import OcrWorker
from outbox_images.storage import s3_client
from projectors.runtime import BatchInterrupted
from tests.auth import AUTH_A
from tests.events import latest_event
from tests.images import upload


class EditingDuringOcrWorker(OcrWorker):
    """The real worker, with a metadata edit through the API while tesseract runs."""

    def __init__(self, *args, edit, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._edit = edit

    def _recognize(self, data):
        result = super()._recognize(data)
        self._edit()
        return result


def _pending(api, lines: list[str]) -> str:
    """An image uploaded through the API (real presigned POST), waiting in `ocr_pending`."""
    body = text_image(lines)
    created = api.post("/v1/images", headers=AUTH_A, json={
        "filename": "scan.png", "content_type": "image/png", "size": len(body),
        "metadata": {"title": "before"}}).json()
    assert upload(created, body).status_code in (200, 204)
    confirmed = api.post(f"/v1/images/{created['id']}/uploaded", headers=AUTH_A).json()
    assert confirmed["state"] == "ocr_pending"
    return created["id"]


def test_metadata_edit_during_ocr_keeps_the_result(api, api_settings, engine):
    image_id = _pending(api, ["Invoice 4711"])

    def edit() -> None:
        r = api.put(f"/v1/images/{image_id}/metadata", headers=AUTH_A,
                    json={"title": "edited while OCR ran"})
        assert r.status_code == 200 and r.json()["state"] == "ocr_running", r.text

    worker = EditingDuringOcrWorker(api_settings, engine, s3_client(api_settings), edit=edit)
    worker.apply([latest_event(engine, image_id)])
    got = api.get(f"/v1/images/{image_id}", headers=AUTH_A).json()
    assert got["state"] == "embedding_pending"
    assert got["metadata"]["title"] == "edited while OCR ran"
    assert got["attempts"] == 1
    assert "4711" in got["ocr"]["text"]


class StopAfterFirstImageWorker(OcrWorker):
    """The real worker; a stop is requested (as SIGTERM does) once it finished one image."""

    def __init__(self, *args, stop: threading.Event, **kwargs) -> None:
        super().__init__(*args, should_stop=stop.is_set, **kwargs)
        self._stop = stop

    def _process(self, event) -> None:
        super()._process(event)
        self._stop.set()


def test_a_stop_mid_batch_hands_back_the_rest(api, api_settings, engine):
    first, second = _pending(api, ["Page one"]), _pending(api, ["Page two"])
    events = [latest_event(engine, first), latest_event(engine, second)]
    s3 = s3_client(api_settings)
    one_at_a_time = api_settings.model_copy(update={"ocr_concurrency": 1})
    stopping = StopAfterFirstImageWorker(one_at_a_time, engine, s3, stop=threading.Event())
    with pytest.raises(BatchInterrupted):
        stopping.apply(events)

    def state(image_id: str) -> tuple[str, int]:
        got = api.get(f"/v1/images/{image_id}", headers=AUTH_A).json()
        return got["state"], got["attempts"]

    assert (state(first), state(second)) == (("embedding_pending", 1), ("ocr_pending", 0))
    OcrWorker(api_settings, engine, s3).apply(events)  # the redelivered batch
    assert (state(first), state(second)) == (("embedding_pending", 1), ("embedding_pending", 1))


class CountingOverlapWorker(OcrWorker):
    """The real worker, noting how many recognitions run at the same moment."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._lock = threading.Lock()
        self.running = self.most = 0

    def _recognize(self, data):
        with self._lock:
            self.running += 1
            self.most = max(self.most, self.running)
        try:
            return super()._recognize(data)
        finally:
            with self._lock:
                self.running -= 1


def test_recognitions_run_side_by_side_up_to_the_concurrency(api, api_settings, engine):
    ids = [_pending(api, [f"Receipt {n}", "Total 3.50"]) for n in range(4)]
    settings = api_settings.model_copy(update={"ocr_concurrency": 2})
    worker = CountingOverlapWorker(settings, engine, s3_client(settings))
    worker.apply([latest_event(engine, i) for i in ids])
    worker.close()
    assert worker.most == 2
    for image_id in ids:
        got = api.get(f"/v1/images/{image_id}", headers=AUTH_A).json()
        assert (got["state"], got["attempts"]) == ("embedding_pending", 1)


def test_a_stop_lets_the_recognitions_under_way_finish(api, api_settings, engine):
    ids = [_pending(api, [f"Page {n}"]) for n in range(3)]
    settings = api_settings.model_copy(update={"ocr_concurrency": 2})
    stopping = StopAfterFirstImageWorker(settings, engine, s3_client(settings),
                                         stop=threading.Event())
    with pytest.raises(BatchInterrupted):
        stopping.apply([latest_event(engine, i) for i in ids])
    states = [api.get(f"/v1/images/{i}", headers=AUTH_A).json()["state"] for i in ids]
    # The first two ran side by side and were finished; the third was handed back.
    assert states == ["embedding_pending", "embedding_pending", "ocr_pending"]
