"""Text recognition with tesseract (via pytesseract), English and Simplified Chinese."""

from __future__ import annotations

import io
import os
import re
from dataclasses import dataclass
from functools import cache

import pytesseract
from PIL import Image

from projectors.metrics import OCR_RUNS

_CJK = "\u3000-\u303f\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uff00-\uffef"
# tesseract puts spaces between CJK characters; they are not words in Chinese.
_CJK_GAP = re.compile(f"(?<=[{_CJK}])[ \t]+(?=[{_CJK}])")
_CJK_CHAR = re.compile(f"[{_CJK}]")
_BLANK_LINES = re.compile(r"\n\s*\n+")


class UnreadableImage(ValueError):
    """The object is not an image the OCR engine can read."""


@dataclass(frozen=True)
class OcrResult:
    """What tesseract read from one image, and which engine read it."""

    text: str
    language: str
    engine: str
    checksum: str = ""  # SHA-256 of the image bytes: the result cache's key


def clean_text(raw: str) -> str:
    """Collapse the spaces tesseract puts between CJK characters and blank lines."""
    text = _CJK_GAP.sub("", raw)
    return _BLANK_LINES.sub("\n", text).strip()


def guess_language(text: str) -> str:
    """`zh` when a good share of the letters are CJK, else `en`."""
    letters = [c for c in text if not c.isspace()]
    if not letters:
        return "und"
    return "zh" if len(_CJK_CHAR.findall(text)) / len(letters) > 0.3 else "en"


def pin_engine_threads() -> None:
    """One thread per tesseract run (unless OMP_THREAD_LIMIT says otherwise): its OpenMP
    threads are slower than one thread for a receipt (0.55 s against 0.33 s on two cores
    here), and recognitions side by side would fight over the cores."""
    os.environ.setdefault("OMP_THREAD_LIMIT", "1")


@cache
def engine_version(languages: str) -> str:
    """`tesseract-<version>:<languages>`: part of the cache key and of the event."""
    return f"tesseract-{pytesseract.get_tesseract_version()}:{languages}"


def recognize(data: bytes, languages: str) -> OcrResult:
    """OCR an image given as bytes."""
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except Exception as exc:  # Pillow raises many types for corrupt data
        raise UnreadableImage(f"cannot decode image: {exc}") from exc
    OCR_RUNS.inc()
    raw = pytesseract.image_to_string(image.convert("RGB"), lang=languages)
    text = clean_text(raw)
    return OcrResult(text=text, language=guess_language(text), engine=engine_version(languages))
