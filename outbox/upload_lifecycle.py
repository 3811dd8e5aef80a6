"""Settling an upload: verify the object of a `requested` image and move it on.

Used by the API when the client confirms, and by the reconciler when a client uploaded but
its confirmation never arrived (the object exists, the "process it" call was lost).
"""

from __future__ import annotations

from botocore.client import BaseClient
from sqlalchemy.engine import Connection, RowMapping

from outbox.image_policy import ImageState
from outbox.image_store import transition
from outbox.settings import Settings
from outbox.upload_verification import UploadRejected, verify_upload


def settle_upload(
    conn: Connection, s3: BaseClient, settings: Settings, row: RowMapping
) -> tuple[RowMapping, UploadRejected | None]:
    """Verify the object of `row` (in `requested`, locked by the caller) and transition it:
    to `uploaded`, and on to `ocr_pending` when metadata is present; or, for an unacceptable
    object, delete it and go to `rejected` (the refusal is returned, not raised, so the
    caller commits it). Raises UploadMissing, writing nothing, when there is no object."""
    try:
        size = verify_upload(s3, settings, row)
    except UploadRejected as exc:
        s3.delete_object(Bucket=settings.s3_bucket, Key=row["object_key"])
        rejected = transition(conn, row, ImageState.REJECTED, settings,
                              {"last_error": f"{exc.code}: {exc.message}"})
        return rejected, exc
    row = transition(conn, row, ImageState.UPLOADED, settings, {"object_size": size})
    if row["metadata"] is not None:
        row = transition(conn, row, ImageState.OCR_PENDING, settings)
    return row, None
