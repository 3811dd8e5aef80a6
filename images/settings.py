"""Settings of the image domain: the object store, upload limits, state deadlines."""

from __future__ import annotations

from pydantic import Field

from outbox.settings import Settings


class ImageSettings(Settings):
    """The core settings plus what image resources need."""

    s3_endpoint: str | None = "http://127.0.0.1:18333"
    s3_bucket: str = "outbox-blobs"
    max_upload_bytes: int = 10 * 1024 * 1024
    upload_url_ttl_s: int = Field(
        default=900, ge=1,
        description="the presigned POST of a new image is valid this long (the API caps it at "
        "15 minutes)",
    )

    # Deadlines of the resource states (seconds) and the OCR/embedding attempt budget.
    deadline_requested_s: int = 15 * 60
    deadline_uploaded_s: int = 24 * 3600
    deadline_ocr_pending_s: int = 10 * 60
    deadline_ocr_running_s: int = 5 * 60
    deadline_embedding_pending_s: int = 10 * 60
    max_attempts: int = Field(default=3, description="OCR and embedding attempts per image")
    result_cache_retention_s: int = Field(
        default=30 * 86400,
        description="OCR and embedding results older than this are deleted (a miss only "
        "redoes the work)",
    )
