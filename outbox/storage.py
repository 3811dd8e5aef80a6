"""The object store (S3 API): the client, upload keys and presigned uploads."""

from __future__ import annotations

from typing import Any

import boto3
from botocore.client import BaseClient
from botocore.config import Config

from outbox.settings import Settings


def s3_client(settings: Settings) -> BaseClient:
    """A boto3 S3 client for the configured endpoint (path-style, SigV4)."""
    return boto3.client(
        "s3",
        endpoint_url=settings.s3_endpoint,
        config=Config(
            signature_version="s3v4",
            s3={"addressing_style": "path"},
            retries={"max_attempts": 3, "mode": "standard"},
        ),
    )


def object_key(org_id: str, image_id: str) -> str:
    """The object key of an image: derived from org and id only, never from client input."""
    return f"orgs/{org_id}/images/{image_id}"


def presigned_post(
    client: BaseClient,
    settings: Settings,
    *,
    key: str,
    content_type: str,
    max_bytes: int,
    expires_in: int,
) -> dict[str, Any]:
    """A presigned POST whose policy pins the key, the content type and the size range,
    so the storage itself refuses a different type or an oversize body."""
    return client.generate_presigned_post(
        settings.s3_bucket,
        key,
        Fields={"Content-Type": content_type},
        Conditions=[{"Content-Type": content_type}, ["content-length-range", 1, max_bytes]],
        ExpiresIn=expires_in,
    )
