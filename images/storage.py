"""Where an image's object lives: the S3 client and the object key."""

from __future__ import annotations

import boto3
from botocore.client import BaseClient
from botocore.config import Config

from images.settings import ImageSettings


def s3_client(settings: ImageSettings, *, timeout_s: float | None = None) -> BaseClient:
    """A boto3 S3 client for the configured endpoint (path-style, SigV4). With `timeout_s`,
    a probe's client: one attempt, connect and read bounded by it (a status must answer
    now, not after botocore's retries and its 60 s default timeouts)."""
    probe = {} if timeout_s is None else {"connect_timeout": timeout_s,
                                          "read_timeout": timeout_s}
    return boto3.client(
        "s3",
        endpoint_url=settings.s3_endpoint,
        config=Config(
            signature_version="s3v4",
            s3={"addressing_style": "path"},
            retries={"max_attempts": 3 if timeout_s is None else 1, "mode": "standard"},
            **probe,
        ),
    )


def object_key(org_id: str, image_id: str) -> str:
    """The object key of an image: derived from org and id only, never from client input."""
    return f"orgs/{org_id}/images/{image_id}"
