"""The OCR worker against the real PostgreSQL and S3, with interleavings the pipeline's
timing makes rare: a metadata edit while OCR runs, a stop in the middle of a batch."""

from __future__ import annotations

import threading

import pytest

from app.sample_images import text_image
from images.storage import s3_client
from projectors.runtime import BatchInterrupted
from projectors.workers.ocr import OcrWorker
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
    stopping = StopAfterFirstImageWorker(api_settings, engine, s3, stop=threading.Event())
    with pytest.raises(BatchInterrupted):
        stopping.apply(events)

    def state(image_id: str) -> tuple[str, int]:
        got = api.get(f"/v1/images/{image_id}", headers=AUTH_A).json()
        return got["state"], got["attempts"]

    assert (state(first), state(second)) == (("embedding_pending", 1), ("ocr_pending", 0))
    OcrWorker(api_settings, engine, s3).apply(events)  # the redelivered batch
    assert (state(first), state(second)) == (("embedding_pending", 1), ("embedding_pending", 1))
