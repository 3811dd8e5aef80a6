"""Uploads: the presigned POST a client sends its object with, and settling an upload
(verify the object of a `requested` image and move it on).

Settling is used by the API when the client confirms, and by the reconciler when a client
uploaded but its confirmation never arrived (the object exists, the "process it" call was
lost).
"""

from __future__ import annotations

from typing import Any

from botocore.client import BaseClient
from sqlalchemy.engine import Connection, RowMapping

from outbox_app.upload_verification import UploadRejected, verify_upload
from outbox_images.policy import ImageState
from outbox_images.settings import ImageSettings
from outbox_images.store import transition


def presigned_post(
    client: BaseClient,
    settings: ImageSettings,
    *,
    key: str,
    content_type: str,
    size: int,
    expires_in: int,
) -> dict[str, Any]:
    """A presigned POST whose policy pins the key, the content type and the declared size,
    so the storage itself refuses a different type or a body of any other size. `client`
    signs for the address clients use (images.storage.presigning_client)."""
    return client.generate_presigned_post(
        settings.s3_bucket,
        key,
        Fields={"Content-Type": content_type},
        Conditions=[{"Content-Type": content_type}, ["content-length-range", size, size]],
        ExpiresIn=expires_in,
    )


def settle_upload(
    conn: Connection, s3: BaseClient, settings: ImageSettings, row: RowMapping
) -> tuple[RowMapping, UploadRejected | None]:
    """Verify the object of `row` (in `requested`, locked by the caller) and transition it:
    to `uploaded`, and on to `ocr_pending` when metadata is present; or, for an unacceptable
    object, delete it and go to `rejected` (the refusal is returned, not raised, so the
    caller commits it). Raises UploadMissing, writing nothing, when there is no object."""
    try:
        size, etag = verify_upload(s3, settings, row)
    except UploadRejected as exc:
        s3.delete_object(Bucket=settings.s3_bucket, Key=row["object_key"])
        rejected = transition(conn, row, ImageState.REJECTED, settings,
                              {"last_error": f"{exc.code}: {exc.message}"})
        return rejected, exc
    row = transition(conn, row, ImageState.UPLOADED, settings,
                     {"object_size": size, "object_etag": etag})
    if row["metadata"] is not None:
        row = transition(conn, row, ImageState.OCR_PENDING, settings)
    return row, None
