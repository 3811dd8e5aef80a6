"""Where an image's object lives: the S3 clients and the object key.

No endpoint (`OUTBOX_S3_ENDPOINT` unset or empty) means AWS S3, in `s3_region` or boto3's
own region configuration (AWS_DEFAULT_REGION, the profile). A custom endpoint (MinIO,
SeaweedFS) gets path-style addressing unless `s3_addressing_style` says otherwise: such
stores rarely have a wildcard DNS name per bucket.
"""

from __future__ import annotations

import boto3
from botocore.client import BaseClient
from botocore.config import Config

from outbox_images.settings import ImageSettings


def addressing_style(settings: ImageSettings) -> str:
    """botocore's addressing style: `auto` is path-style for a custom endpoint, and botocore's
    own choice on AWS (virtual-hosted, path-style for a bucket name that is no DNS name)."""
    if settings.s3_addressing_style == "auto" and settings.s3_endpoint:
        return "path"
    return settings.s3_addressing_style


def _client(settings: ImageSettings, endpoint: str | None, timeout_s: float | None
            ) -> BaseClient:
    probe = {} if timeout_s is None else {"connect_timeout": timeout_s,
                                          "read_timeout": timeout_s}
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name=settings.s3_region,
        config=Config(
            signature_version="s3v4",
            s3={"addressing_style": addressing_style(settings)},
            retries={"max_attempts": 3 if timeout_s is None else 1, "mode": "standard"},
            **probe,
        ),
    )


def s3_client(settings: ImageSettings, *, timeout_s: float | None = None) -> BaseClient:
    """A boto3 S3 client for the configured endpoint (SigV4; AWS when none). With `timeout_s`,
    a probe's client: one attempt, connect and read bounded by it (a status must answer now,
    not after botocore's retries and its 60 s default timeouts)."""
    return _client(settings, settings.s3_endpoint, timeout_s)


def presigning_client(settings: ImageSettings) -> BaseClient:
    """The client that signs the URLs handed to clients outside: its endpoint is
    `s3_public_endpoint` when set (an address they can resolve, where the processes use an
    internal one such as http://minio:9000), else the processes' own. Signing needs no
    network, so this client never connects."""
    return _client(settings, settings.s3_public_endpoint or settings.s3_endpoint, None)


def object_key(org_id: str, image_id: str) -> str:
    """The object key of an image: derived from org and id only, never from client input."""
    return f"orgs/{org_id}/images/{image_id}"
