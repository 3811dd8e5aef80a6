"""Checking an uploaded object before the resource may move to `uploaded`.

The object is HEADed for size and type, then read: its first bytes are sniffed (an image type
must hold image bytes), its structure is checked by Pillow (a valid signature followed by
anything else is not an image), and, when the client declared one, its SHA-256 is compared.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Mapping
from typing import Any

from botocore.client import BaseClient
from botocore.exceptions import ClientError
from PIL import Image

from outbox_images.settings import ImageSettings

ALLOWED_CONTENT_TYPES = frozenset({"image/png", "image/jpeg", "image/webp"})


class UploadMissing(Exception):
    """No object under the resource's key yet: the upload has not finished."""


class UploadRejected(Exception):
    """The object is not acceptable; `code` (machine-readable) and `message` say why."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


def sniff_image_type(head: bytes) -> str | None:
    """The image type the leading bytes belong to, if any of the accepted ones."""
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if head.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if len(head) >= 12 and head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image/webp"
    return None


def _unreadable(data: bytes) -> str | None:
    """Why Pillow cannot read `data` as an image (None when it can). The header and the
    structure are checked (for PNG, every chunk's CRC); the pixels are not decoded."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.verify()
    except Exception as exc:  # Pillow raises many types for corrupt data
        return str(exc) or type(exc).__name__
    return None


def verify_upload(client: BaseClient, settings: ImageSettings, image: Mapping[str, Any]
                  ) -> tuple[int, str]:
    """Verify the object of `image`; return its size and ETag (what OCR will insist on), or
    raise UploadMissing/UploadRejected."""
    bucket, key = settings.s3_bucket, image["object_key"]
    try:
        head = client.head_object(Bucket=bucket, Key=key)
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in {"404", "NoSuchKey", "NotFound"}:
            raise UploadMissing(f"no object uploaded for image {image['id']} yet") from exc
        raise
    size = int(head["ContentLength"])
    if size != image["declared_size"]:
        raise UploadRejected("size_mismatch", f"object is {size} bytes, "
                             f"{image['declared_size']} were declared")
    if size > settings.max_upload_bytes:
        raise UploadRejected("too_large", f"object is {size} bytes, the maximum is "
                             f"{settings.max_upload_bytes}")
    stored_type = head.get("ContentType", "")
    if stored_type != image["content_type"]:
        raise UploadRejected(
            "unsupported_media_type",
            f"object stored as {stored_type!r}, declared {image['content_type']!r}",
        )
    # Whole, as the size was checked above: at most max_upload_bytes. The ETag pinned is the
    # one of the bytes checked here (the object may have changed since the HEAD).
    got = client.get_object(Bucket=bucket, Key=key)
    data = got["Body"].read()
    if len(data) != size:
        raise UploadRejected("size_mismatch", f"object is {len(data)} bytes, declared {size}")
    if sniff_image_type(data[:16]) != image["content_type"]:
        raise UploadRejected("not_an_image",
                             f"object bytes are not a {image['content_type']} image")
    problem = _unreadable(data)
    if problem is not None:
        raise UploadRejected("not_an_image",
                             f"object is not a readable {image['content_type']} image: {problem}")
    expected = image["checksum_sha256"]
    if expected and hashlib.sha256(data).hexdigest() != expected:
        raise UploadRejected("checksum_mismatch", "object SHA-256 differs from the declared")
    return size, got["ETag"]
