"""Settings of the image domain: the object store, upload limits, state deadlines."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from outbox.settings import Settings


class ImageSettings(Settings):
    """The core settings plus what image resources need."""

    s3_endpoint: str | None = Field(
        default=None,
        description="S3 endpoint URL (MinIO, SeaweedFS, ...); unset or empty: AWS S3, its "
        "region and credentials from the AWS_* variables")
    s3_bucket: str = Field(default="outbox-blobs", description="the bucket of image objects")
    s3_public_endpoint: str | None = Field(
        default=None,
        description="endpoint in the presigned upload URLs given to clients, when they reach "
        "the store at another address than the processes (https://files.example.com for an "
        "internal http://minio:9000); unset: OUTBOX_S3_ENDPOINT")
    s3_region: str | None = Field(
        default=None,
        description="the bucket's AWS region (unset: AWS_DEFAULT_REGION, then boto3's "
        "configuration)")
    s3_addressing_style: Literal["auto", "virtual", "path"] = Field(
        default="auto",
        description="auto: path-style for a custom endpoint (MinIO, SeaweedFS), boto3's choice "
        "on AWS (virtual-hosted); virtual or path forces one")
    max_upload_bytes: int = Field(default=10 * 1024 * 1024, ge=1,
                                  description="largest image accepted")
    upload_url_ttl_s: int = Field(
        default=900, ge=1,
        description="the presigned POST of a new image is valid this long (the API caps it at "
        "15 minutes)",
    )

    # Deadlines of the resource states (seconds) and the OCR/embedding attempt budget.
    deadline_requested_s: int = Field(
        default=15 * 60, description="an upload URL never used expires after this")
    deadline_uploaded_s: int = Field(
        default=24 * 3600, description="an upload whose metadata never came is abandoned "
        "after this")
    deadline_ocr_pending_s: int = Field(
        default=10 * 60, description="the reconciler acts on an image in ocr_pending or "
        "ocr_done longer than this")
    deadline_ocr_running_s: int = Field(
        default=5 * 60, description="the reconciler re-drives OCR not finished after this")
    deadline_embedding_pending_s: int = Field(
        default=10 * 60, description="the reconciler re-drives an embedding not done after this")
    max_attempts: int = Field(default=3, description="OCR and embedding attempts per image")
    max_crashes: int = Field(
        default=5, ge=1,
        description="OCR attempts per image that may end with no result (the worker died or "
        "hung past OUTBOX_DEADLINE_OCR_RUNNING_S) before the image is ocr_failed; they do not "
        "count against OUTBOX_MAX_ATTEMPTS")
    result_cache_retention_s: int = Field(
        default=30 * 86400,
        description="OCR and embedding results older than this are deleted (a miss only "
        "redoes the work)",
    )

    @field_validator("s3_endpoint", "s3_public_endpoint", "s3_region", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: Any) -> Any:
        """An empty value means unset (OUTBOX_S3_ENDPOINT= is AWS), never the endpoint ''."""
        return None if isinstance(value, str) and not value.strip() else value
