"""Images with known text, for the demo and the tests (Pillow and a CJK font from Debian)."""

from __future__ import annotations

import io
from functools import cache
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

FONT_CANDIDATES = (
    "/usr/share/fonts/truetype/wqy/wqy-microhei.ttc",
    "/usr/share/fonts/truetype/wqy/wqy-zenhei.ttc",
    "/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc",
)


@cache
def cjk_font(size: int = 40) -> ImageFont.FreeTypeFont:
    """A font with Latin and CJK glyphs (make bootstrap installs fonts-wqy-microhei)."""
    for path in FONT_CANDIDATES:
        if Path(path).exists():
            return ImageFont.truetype(path, size)
    raise FileNotFoundError(f"no CJK font found (looked for {', '.join(FONT_CANDIDATES)})")


def text_image(lines: list[str], fmt: str = "PNG", size: int = 40) -> bytes:
    """Black text on white, one line per entry, large enough for OCR."""
    font = cjk_font(size)
    width = max(int(font.getlength(line)) for line in lines) + 60
    height = (size + 20) * len(lines) + 40
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    for i, line in enumerate(lines):
        draw.text((30, 20 + i * (size + 20)), line, font=font, fill="black")
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()
