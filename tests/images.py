"""Test helpers: real image bytes and real presigned uploads."""

from __future__ import annotations

import io
import struct
import zlib
from typing import Any

import requests
from PIL import Image, ImageDraw


def png_bytes(text: str = "hello", size: tuple[int, int] = (120, 40)) -> bytes:
    """A small PNG with `text` drawn on it."""
    img = Image.new("RGB", size, "white")
    ImageDraw.Draw(img).text((5, 10), text, fill="black")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def undecodable_png() -> bytes:
    """A PNG whose structure is sound (chunks, CRCs) but whose pixel data does not inflate: it
    passes the check at confirmation and fails when OCR decodes it."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data)
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", 64, 32, 8, 0, 0, 0, 0)  # 64x32, 8-bit grey
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", b"\x00garbage" * 50)
            + chunk(b"IEND", b""))


def upload(created: dict[str, Any], body: bytes, filename: str = "x.png") -> requests.Response:
    """Send `body` with the presigned POST the API returned (plain HTTP, no SDK)."""
    return requests.post(
        created["upload_url"],
        data=created["upload_fields"],
        files={"file": (filename, body)},
        timeout=30,
    )


def submit_receipt(api: Any, title: str, total: str = "3.30") -> str:
    """A receipt image titled `title` created through the API (a TestClient, as org A),
    uploaded with its presigned POST and confirmed with metadata, so it goes straight to OCR;
    returns its id."""
    from outbox_app.sample_images import text_image
    from tests.auth import AUTH_A

    body = text_image([title, f"Total {total}"])
    created = api.post("/v1/images", headers=AUTH_A, json={
        "filename": "receipt.png", "content_type": "image/png", "size": len(body),
        "metadata": {"title": title}}).json()
    assert upload(created, body).status_code in (200, 204)
    assert api.post(f"/v1/images/{created['id']}/uploaded", headers=AUTH_A).status_code == 200
    return created["id"]


def is_searchable(api: Any, image_id: str) -> bool:
    """Whether the API reports the image searchable (both views at its database version)."""
    from tests.auth import AUTH_A

    return api.get(f"/v1/images/{image_id}", headers=AUTH_A).json()["searchable"] is True
