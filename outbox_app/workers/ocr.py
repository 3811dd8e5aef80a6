"""The OCR worker: `ocr_pending` -> `ocr_running` -> OCR -> `ocr_done` -> `embedding_pending`
(or back to `ocr_pending` for another attempt, or `ocr_failed` after the last), every step a
transition with its outbox event. It never writes a view. It also removes the object of a
deleted image."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import asdict, replace

import structlog
from botocore.client import BaseClient
from sqlalchemy import select
from sqlalchemy.engine import Connection, Engine, RowMapping

from outbox.envelope import EventEnvelope
from outbox.tracking import claim_event
from outbox_app.settings import WorkerSettings
from outbox_app.workers.ocr_engine import (
    OcrResult,
    engine_version,
    pin_engine_threads,
    recognize,
)
from outbox_app.workers.result_cache import cached_result, store_result
from outbox_images.policy import ImageState
from outbox_images.store import ImageNotFound, load_image, lock_at_version, transition
from outbox_images.tables import image_table
from projectors.apply_spans import applying
from projectors.runtime import BatchInterrupted

log = structlog.get_logger(__name__)
S = ImageState


class ObjectChanged(Exception):
    """The object under the image's key is not the one that was verified."""


def _crashed_before(events: list[EventEnvelope]) -> bool:
    """One image's events ask for OCR of an image that crashed a worker before."""
    return any(e.payload.get("state") == S.OCR_PENDING and e.payload.get("crashes")
               for e in events)


class OcrWorker:
    """Projector `ocr`."""

    name = "ocr"
    aggregate_types: Sequence[str] = ("image",)

    def __init__(self, settings: WorkerSettings, engine: Engine, s3: BaseClient,
                 should_stop: Callable[[], bool] = lambda: False) -> None:
        self._settings = settings
        self._engine = engine
        self._s3 = s3
        self._should_stop = should_stop
        self._pool = ThreadPoolExecutor(settings.ocr_concurrency, thread_name_prefix="ocr")
        pin_engine_threads()

    def apply(self, events: list[EventEnvelope]) -> None:
        """Run OCR for every event that finds its image waiting in `ocr_pending`, up to
        `ocr_concurrency` images at once (one image's events in their order), then each image
        that crashed a worker before on its own. On a stop request, raise BatchInterrupted
        once the recognitions under way are done: each image's result is committed on its
        own, so the rest of the batch is simply redelivered. Any other error is raised after
        the others finished."""
        by_image: dict[str, list[EventEnvelope]] = {}
        for event in events:
            by_image.setdefault(event.aggregate_id, []).append(event)
        # A worker that dies charges a crash to every image it was recognising. An image
        # that crashed before runs alone, so its next crash is its own and the images beside
        # it the first time are not failed with it.
        groups = list(by_image.values())
        rounds = [[evs for evs in groups if not _crashed_before(evs)],
                  *([evs] for evs in groups if _crashed_before(evs))]
        errors: list[BaseException] = []
        for images in rounds:
            futures = [self._pool.submit(self._apply_image, evs) for evs in images]
            wait(futures)
            errors += [e for f in futures if (e := f.exception()) is not None]
            if any(isinstance(e, BatchInterrupted) for e in errors):
                raise BatchInterrupted
        if errors:
            raise errors[0]

    def _apply_image(self, events: list[EventEnvelope]) -> None:
        for event in events:
            if self._should_stop():
                raise BatchInterrupted
            with applying(event):  # its results continue the event's trace
                self._apply_event(event)

    def _apply_event(self, event: EventEnvelope) -> None:
        state = event.payload.get("state")
        if state == S.OCR_PENDING:
            self._process(event)
        elif state == S.DELETED and event.payload.get("object_key"):
            # The worker that reads objects also removes them; deleting twice is fine.
            self._s3.delete_object(Bucket=self._settings.s3_bucket,
                                   Key=event.payload["object_key"])

    def _start(self, event: EventEnvelope) -> RowMapping | None:
        with self._engine.begin() as conn:
            if not claim_event(conn, self.name, event.id):
                return None
            row = lock_at_version(conn, event.aggregate_id, S.OCR_PENDING,
                                  event.aggregate_version)
            if row is None:
                return None
            return transition(conn, row, S.OCR_RUNNING, self._settings,
                              {"attempts": row["attempts"] + 1})

    def _process(self, event: EventEnvelope) -> None:
        # Everything that needs the bucket or the database happens before the attempt
        # starts: an outage raises here, is waited out by the runtime with the image still
        # `ocr_pending`, and costs no attempt. Only what the image itself causes (bytes the
        # engine cannot read, an object replaced after verification) is a failed attempt.
        if not self._still_pending(event):
            return
        try:
            data, failure = self._read_object(event.payload), None
        except ObjectChanged as exc:
            data, failure = b"", str(exc)
        checksum = hashlib.sha256(data).hexdigest()
        engine_id = engine_version(self._settings.ocr_languages)
        with self._engine.connect() as conn:
            hit = cached_result(conn, "ocr", checksum, engine_id) if failure is None else None
        running = self._start(event)
        if running is None:
            return
        if failure is not None:
            self._fail(running, failure)
            return
        try:
            if hit is not None:
                result = OcrResult(**{**hit, "checksum": checksum})
            else:
                # One line per engine run: the fault suite counts runs per attempt from it.
                log.info("ocr_engine_run", image=event.aggregate_id,
                         attempt=running["attempts"], crashes=running["crashes"])
                result = replace(self._recognize(data), checksum=checksum)
        except Exception as exc:  # the engine refused these bytes: a failed attempt
            self._fail(running, f"{type(exc).__name__}: {exc}")
            return
        with self._engine.begin() as conn:
            if hit is None:
                store_result(conn, "ocr", checksum, engine_id, asdict(result))
            row = self._still_running(conn, running)
            if row is None:
                log.info("ocr_result_dropped", image=event.aggregate_id,
                         reason="the image left this attempt meanwhile")
                return
            done = transition(conn, row, S.OCR_DONE, self._settings,
                              {"ocr": asdict(result), "last_error": None})
            transition(conn, done, S.EMBEDDING_PENDING, self._settings)
        log.info("ocr_done", image=event.aggregate_id, chars=len(result.text),
                 language=result.language)

    def _recognize(self, data: bytes) -> OcrResult:
        """Run the engine on the image's bytes."""
        return recognize(data, self._settings.ocr_languages)

    def _still_pending(self, event: EventEnvelope) -> bool:
        """The image still waits for this event's OCR (a cheap, unlocked look first)."""
        with self._engine.connect() as conn:
            row = conn.execute(select(image_table.c.state, image_table.c.version).where(
                image_table.c.id == uuid.UUID(event.aggregate_id))).one_or_none()
        return row is not None and row.state == S.OCR_PENDING and \
            row.version == event.aggregate_version

    def _read_object(self, image: dict) -> bytes:
        """The verified object's bytes; ObjectChanged when it was replaced after it was
        verified (its ETag no longer matches the one recorded then)."""
        pinned = image.get("object_etag")
        got = self._s3.get_object(Bucket=self._settings.s3_bucket, Key=image["object_key"])
        if pinned and got.get("ETag") != pinned:
            got["Body"].close()
            raise ObjectChanged(f"the object was replaced after it was verified (ETag "
                                f"{got.get('ETag')}, verified {pinned})")
        return got["Body"].read()

    def _fail(self, running: RowMapping, error: str) -> None:
        last = running["attempts"] >= self._settings.max_attempts
        with self._engine.begin() as conn:
            row = self._still_running(conn, running)
            if row is None:
                return  # someone else moved it meanwhile (deleted, reconciled)
            transition(conn, row, S.OCR_FAILED if last else S.OCR_PENDING, self._settings,
                       {"last_error": error[:1000]})
        log.warning("ocr_attempt_failed", image=str(running["id"]),
                    attempt=running["attempts"], final=last, error=error[:200])

    @staticmethod
    def _still_running(conn: Connection, running: RowMapping) -> RowMapping | None:
        """The image, locked, if it is still in the attempt `running` started. A metadata
        edit meanwhile bumps the version but keeps the attempt: the result still applies.
        (attempts, crashes) identifies the attempt: a crash gives the attempt back."""
        try:
            row = load_image(conn, running["org_id"], running["id"], for_update=True)
        except ImageNotFound:
            return None
        if row["state"] != S.OCR_RUNNING or (row["attempts"], row["crashes"]) != (
                running["attempts"], running["crashes"]):
            return None
        return row

    def close(self) -> None:
        """Stop the recognition threads (the engine is shared)."""
        self._pool.shutdown()
