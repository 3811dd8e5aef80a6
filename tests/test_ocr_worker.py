"""The OCR worker against the real PostgreSQL and S3, with interleavings the pipeline's
timing makes rare: a metadata edit while OCR runs."""

from __future__ import annotations

from outbox.sample_images import text_image
from outbox.storage import s3_client
from projectors.ocr import OcrWorker
from tests.auth import AUTH_A
from tests.events import latest_event
from tests.images import upload


class EditingDuringOcrWorker(OcrWorker):
    """The real worker, with a metadata edit through the API while tesseract runs."""

    def __init__(self, *args, edit, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._edit = edit

    def _recognize(self, image):
        result = super()._recognize(image)
        self._edit()
        return result


def test_metadata_edit_during_ocr_keeps_the_result(api, api_settings, engine):
    body = text_image(["Invoice 4711"])
    created = api.post("/v1/images", headers=AUTH_A, json={
        "filename": "scan.png", "content_type": "image/png", "size": len(body),
        "metadata": {"title": "before"}}).json()
    image_id = created["id"]
    assert upload(created, body).status_code in (200, 204)
    assert api.post(f"/v1/images/{image_id}/uploaded", headers=AUTH_A).json()["state"] == \
        "ocr_pending"

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
