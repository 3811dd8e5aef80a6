"""A worker's crash is not the image's fault: `outbox project ocr` as a process, SIGKILLed
whenever it recognises one chosen image, with the reconciler giving cut attempts back."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from outbox_app.reconciler import Reconciler
from outbox_app.sample_images import text_image
from outbox_images.policy import ImageState
from outbox_images.storage import s3_client
from tests.faults.pipeline_run import PipelineRun, pipeline_run
from tests.ocr_process import OcrProcess, image_row, slow_image
from tests.pipeline_harness import wait_for

pytestmark = pytest.mark.slow
S = ImageState
# Past this an attempt with no result is a crash. Well above the slow image's 1.5 s.
RUNNING_DEADLINE_S = 8


@contextmanager
def _killable_ocr(tag: str, tmp_path, max_crashes: int) -> Iterator[tuple[PipelineRun,
                                                                         OcrProcess]]:
    """The relay, an OCR process (two recognitions at once) and the reconciler."""
    with pipeline_run(tag, threads=()) as run:
        env = {"OUTBOX_DEADLINE_OCR_RUNNING_S": str(RUNNING_DEADLINE_S),
               "OUTBOX_OCR_CONCURRENCY": "2", "OUTBOX_MAX_CRASHES": str(max_crashes)}
        ocr = OcrProcess(run.settings, tmp_path, **env)
        reconciler = Reconciler(run.settings.model_copy(update={
            "deadline_ocr_running_s": RUNNING_DEADLINE_S, "max_crashes": max_crashes}),
            run.engine, s3_client(run.settings))
        thread = threading.Thread(target=reconciler.run, args=(0.5,), daemon=True)
        thread.start()
        ocr.start()
        try:
            yield run, ocr
        finally:
            reconciler.stop.set()
            thread.join(30)
            ocr.stop()


def _submit(run: PipelineRun, others: int) -> tuple[str, list[str]]:
    """The slow image first, then `others` small ones, so that they share its first batch."""
    target = run.submit_image(slow_image(), "a long receipt")
    return target, [run.submit_image(text_image([f"Receipt {i}", "Total 9.99"]), f"r{i}")
                    for i in range(others)]


def _kill_during(run: PipelineRun, ocr: OcrProcess, image_id: str) -> None:
    """SIGKILL the OCR process during a recognition of `image_id`, prove that it landed
    there (the attempt is left `ocr_running`), and start the process again."""
    ocr.kill_during(image_id)
    assert image_row(run.engine, image_id)["state"] == S.OCR_RUNNING
    ocr.start()


def _ocr_done(run: PipelineRun, ids: list[str]) -> bool:
    return all(image_row(run.engine, i)["state"] == S.EMBEDDING_PENDING for i in ids)


def test_kills_during_one_image_fail_no_image(tmp_path):
    with _killable_ocr("crk", tmp_path, max_crashes=5) as (run, ocr):
        target, others = _submit(run, 5)
        for _ in range(3):
            _kill_during(run, ocr, target)
        wait_for(lambda: _ocr_done(run, [target, *others]), timeout_s=180,
                 what="every image through OCR")
        assert ocr.runs_of(target) == 4
        hit = image_row(run.engine, target)
        # Three crashes, none charged as an attempt: only the attempt that succeeded counts.
        assert (hit["crashes"], hit["attempts"], hit["last_error"]) == (3, 1, None)
        for image_id in others:
            row = image_row(run.engine, image_id)
            assert row["attempts"] == 1 and row["crashes"] <= 1, row


def test_an_image_that_crashes_the_worker_every_time_is_failed_alone(tmp_path):
    with _killable_ocr("crp", tmp_path, max_crashes=3) as (run, ocr):
        poison, others = _submit(run, 5)
        for _ in range(3):
            _kill_during(run, ocr, poison)
        wait_for(lambda: image_row(run.engine, poison)["state"] == S.OCR_FAILED,
                 timeout_s=60, what="the image failed by the reconciler")
        wait_for(lambda: _ocr_done(run, others), timeout_s=180,
                 what="the other images through OCR")
        assert ocr.runs_of(poison) == 3
        hit = image_row(run.engine, poison)
        assert (hit["crashes"], hit["attempts"]) == (3, 0)
        assert hit["last_error"].startswith("crashed the OCR worker 3 times")
        for image_id in others:
            row = image_row(run.engine, image_id)
            assert row["attempts"] == 1 and row["crashes"] <= 1, row
