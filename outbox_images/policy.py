"""The image state machine, declared once: legal transitions, their events, and deadlines."""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from outbox_images.settings import ImageSettings


class ImageState(StrEnum):
    """States of an image resource (persistent, user-visible)."""

    REQUESTED = "requested"  # upload URL issued, bound to the id
    UPLOADED = "uploaded"  # object verified by HEAD; metadata not yet given
    REJECTED = "rejected"  # the uploaded object failed verification and was deleted
    OCR_PENDING = "ocr_pending"
    OCR_RUNNING = "ocr_running"
    OCR_DONE = "ocr_done"
    OCR_FAILED = "ocr_failed"
    EMBEDDING_PENDING = "embedding_pending"
    EMBEDDED = "embedded"
    EMBEDDING_FAILED = "embedding_failed"
    EXPIRED = "expired"  # never uploaded before the deadline
    ABANDONED = "abandoned"  # uploaded, metadata never came
    DELETED = "deleted"


S = ImageState

TERMINAL: frozenset[ImageState] = frozenset(
    {S.REJECTED, S.OCR_FAILED, S.EMBEDDING_FAILED, S.EXPIRED, S.ABANDONED, S.DELETED}
)

# States in which metadata may be (re)written: before or after the upload, not once final.
METADATA_EDITABLE: frozenset[ImageState] = frozenset(set(S) - TERMINAL)

# (from, to) -> event type. A (state, state) entry is an update that keeps the state.
TRANSITIONS: dict[tuple[ImageState, ImageState], str] = {
    (S.REQUESTED, S.UPLOADED): "image.uploaded",
    (S.REQUESTED, S.REJECTED): "image.upload_rejected",
    (S.REQUESTED, S.EXPIRED): "image.expired",
    (S.UPLOADED, S.OCR_PENDING): "image.ocr_requested",
    (S.UPLOADED, S.ABANDONED): "image.abandoned",
    (S.OCR_PENDING, S.OCR_RUNNING): "image.ocr_started",
    (S.OCR_RUNNING, S.OCR_DONE): "image.ocr_completed",
    (S.OCR_RUNNING, S.OCR_PENDING): "image.ocr_retry",
    (S.OCR_RUNNING, S.OCR_FAILED): "image.ocr_failed",
    (S.OCR_DONE, S.EMBEDDING_PENDING): "image.embedding_requested",
    (S.EMBEDDING_PENDING, S.EMBEDDED): "image.embedded",
    # A metadata edit after embedding asks for a vector of the new text.
    (S.EMBEDDED, S.EMBEDDING_PENDING): "image.embedding_requested",
    (S.EMBEDDING_PENDING, S.EMBEDDING_FAILED): "image.embedding_failed",
    # An operator's retry of a failed image (`outbox retry`): back to waiting for the work.
    (S.OCR_FAILED, S.OCR_PENDING): "image.ocr_retried",
    (S.EMBEDDING_FAILED, S.EMBEDDING_PENDING): "image.embedding_retried",
    # The audit found the object gone while the image still needed it for OCR.
    (S.UPLOADED, S.OCR_FAILED): "image.ocr_failed",
    (S.OCR_PENDING, S.OCR_FAILED): "image.ocr_failed",
    **{(s, s): "image.metadata_updated" for s in METADATA_EDITABLE},
    **{(s, S.DELETED): "image.deleted" for s in S if s is not S.DELETED},
}

CREATED_EVENT = "image.requested"

# A same-state update that carries the current document again, so the views converge on the
# database: how the audit repairs drift through the log (in any state, final ones included).
RESYNC_EVENT = "image.resynced"

# States whose object must still be in the bucket (OCR has not read it yet).
NEEDS_OBJECT: frozenset[ImageState] = frozenset({S.UPLOADED, S.OCR_PENDING, S.OCR_RUNNING})
# Final states whose object should be gone: deleted on delete, expiry and abandonment.
OBJECT_GONE: frozenset[ImageState] = frozenset({S.REJECTED, S.EXPIRED, S.ABANDONED, S.DELETED})

# Failed states an operator can retry, and where the retry sends the image.
RETRYABLE: dict[ImageState, ImageState] = {
    S.OCR_FAILED: S.OCR_PENDING,
    S.EMBEDDING_FAILED: S.EMBEDDING_PENDING,
}

# Waiting states whose work the reconciler asks for again once overdue (the event that
# asked for it was dead-lettered, or its worker was down): same state, new version, new
# deadline, and this event. Workers act only on an image's current version, so the older
# request, if it still arrives, does nothing.
REQUEUE_EVENTS: dict[ImageState, str] = {
    S.OCR_PENDING: "image.ocr_requeued",
    S.EMBEDDING_PENDING: "image.embedding_requeued",
}


def deadline_seconds(state: ImageState, settings: ImageSettings) -> int | None:
    """Seconds a resource may stay in `state` before the reconciler acts; None: no deadline."""
    return {
        S.REQUESTED: settings.deadline_requested_s,
        S.UPLOADED: settings.deadline_uploaded_s,
        S.OCR_PENDING: settings.deadline_ocr_pending_s,
        S.OCR_RUNNING: settings.deadline_ocr_running_s,
        S.OCR_DONE: settings.deadline_ocr_pending_s,
        S.EMBEDDING_PENDING: settings.deadline_embedding_pending_s,
    }.get(state)


def after_crash(attempts: int, crashes: int, settings: ImageSettings
                ) -> tuple[ImageState, dict[str, Any]]:
    """Where an OCR attempt that ended with no result (its worker died or hung past the
    `ocr_running` deadline) sends its image, and the changes to write.

    A dead worker is not the image's fault: the attempt is given back and counted as a crash
    instead, against the larger OUTBOX_MAX_CRASHES budget. The worker recognises an image
    that crashed before on its own, so a later crash is that image's alone, and only an image
    that keeps crashing the worker is failed."""
    crashes += 1
    changes: dict[str, Any] = {"attempts": max(attempts - 1, 0), "crashes": crashes}
    if crashes >= settings.max_crashes:
        return S.OCR_FAILED, {**changes, "last_error": (
            f"crashed the OCR worker {crashes} times (no result before the ocr_running "
            "deadline)")}
    return S.OCR_PENDING, {**changes, "last_error": (
        f"OCR attempt ended with no result (worker died or hung), crash {crashes} of "
        f"{settings.max_crashes}; the next attempt runs alone")}
