"""`outbox retry`: send failed images back to the work they failed at.

Each retry is a guarded transition (`ocr_failed` -> `ocr_pending`, `embedding_failed` ->
`embedding_pending`) with its event, the attempts and crashes counted from zero again; an
image that moved on meanwhile, or is not failed, is skipped with the reason.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Iterator

from botocore.client import BaseClient
from sqlalchemy import select
from sqlalchemy.engine import Engine

from outbox_app.upload_verification import UploadMissing, UploadRejected, verify_upload
from outbox_images.policy import RETRYABLE, ImageState
from outbox_images.settings import ImageSettings
from outbox_images.store import StaleVersion, transition
from outbox_images.tables import image_table


def failed_images(engine: Engine, state: ImageState, org: str | None, batch: int = 500
                  ) -> Iterator[uuid.UUID]:
    """The ids of the images in `state` (of `org`), in keyset ranges."""
    t = image_table.c
    last: uuid.UUID | None = None
    while True:
        stmt = select(t.id).where(t.state == state).order_by(t.id).limit(batch)
        if org is not None:
            stmt = stmt.where(t.org_id == org)
        if last is not None:
            stmt = stmt.where(t.id > last)
        with engine.connect() as conn:
            ids = conn.execute(stmt).scalars().all()
        if not ids:
            return
        yield from ids
        last = ids[-1]


def retry(engine: Engine, settings: ImageSettings, s3: BaseClient, ids: Iterable[uuid.UUID],
          org: str | None = None) -> dict[str, object]:
    """Retry each image; return which were retried and which were skipped, and why. An OCR
    retry verifies the object again (it may have been uploaded anew to fix the failure) and
    pins what it verified."""
    retried: list[str] = []
    skipped: dict[str, str] = {}
    for image_id in ids:
        t = image_table.c
        with engine.begin() as conn:
            stmt = select(image_table).where(t.id == image_id).with_for_update()
            if org is not None:
                stmt = stmt.where(t.org_id == org)
            row = conn.execute(stmt).mappings().one_or_none()
            if row is None:
                skipped[str(image_id)] = "not found"
                continue
            target = RETRYABLE.get(ImageState(row["state"]))
            if target is None:
                skipped[str(image_id)] = f"{row['state']} is not a failed state"
                continue
            changes: dict[str, object] = {"attempts": 0, "crashes": 0, "last_error": None}
            if target is ImageState.OCR_PENDING:
                try:
                    changes["object_size"], changes["object_etag"] = verify_upload(
                        s3, settings, row)
                except (UploadMissing, UploadRejected) as exc:
                    skipped[str(image_id)] = f"the object does not verify: {exc}"
                    continue
            try:
                transition(conn, row, target, settings, changes)
            except StaleVersion as exc:
                skipped[str(image_id)] = exc.message
                continue
        retried.append(str(image_id))
    return {"retried": retried, "skipped": skipped}
