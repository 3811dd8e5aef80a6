"""Test helpers: real image bytes and real presigned uploads."""

from __future__ import annotations

import io
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


def upload(created: dict[str, Any], body: bytes, filename: str = "x.png") -> requests.Response:
    """Send `body` with the presigned POST the API returned (plain HTTP, no SDK)."""
    return requests.post(
        created["upload_url"],
        data=created["upload_fields"],
        files={"file": (filename, body)},
        timeout=30,
    )
