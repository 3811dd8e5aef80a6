"""Request and response bodies of the HTTP API, validated at the edge."""

from __future__ import annotations

import re
import uuid
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from outbox_app.views.search_reader import SearchHit

# C0/C1 control characters (and DEL); text fields refuse them, `description` allows \n and \t.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_CONTROL_BUT_WHITESPACE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def _no_control(value: str) -> str:
    if _CONTROL.search(value):
        raise ValueError("control characters are not allowed")
    return value


def _no_control_but_whitespace(value: str) -> str:
    if _CONTROL_BUT_WHITESPACE.search(value):
        raise ValueError("control characters other than newline and tab are not allowed")
    return value


def _valid_filename(value: str) -> str:
    if "/" in value or "\\" in value:
        raise ValueError("a filename must not contain path separators")
    if value in {".", ".."} or not value.strip():
        raise ValueError("not a filename")
    return _no_control(value)


PlainText = Annotated[str, AfterValidator(_no_control)]
Filename = Annotated[str, Field(min_length=1, max_length=255), AfterValidator(_valid_filename)]
Tag = Annotated[str, Field(min_length=1, max_length=64), AfterValidator(_no_control)]


class ImageMetadata(BaseModel):
    """User-given metadata of an image."""

    model_config = ConfigDict(extra="forbid")

    title: Annotated[PlainText, Field(min_length=1, max_length=200)]
    description: Annotated[
        str, Field(max_length=5000), AfterValidator(_no_control_but_whitespace)
    ] | None = None
    tags: list[Tag] = Field(default_factory=list, max_length=32)
    language: Annotated[str, Field(pattern=r"^[a-z]{2,3}(-[A-Za-z0-9]{2,8}){0,3}$")] | None = None


class ImageCreate(BaseModel):
    """`POST /v1/images`: declare an upload."""

    model_config = ConfigDict(extra="forbid")

    filename: Filename
    content_type: Annotated[str, Field(min_length=1, max_length=100)]
    size: int = Field(gt=0, description="declared size in bytes")
    checksum_sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")] | None = None
    metadata: ImageMetadata | None = None


class ImageCreated(BaseModel):
    """The new resource and how to upload its object."""

    id: uuid.UUID
    state: str
    version: int
    upload_url: str
    upload_method: Literal["POST", "PUT"]
    upload_headers: dict[str, str]
    upload_fields: dict[str, str]
    expires_at: datetime


class ImageView(BaseModel):
    """An image as the API shows it."""

    id: uuid.UUID
    org_id: str
    state: str
    version: int
    filename: str
    content_type: str
    declared_size: int
    object_size: int | None
    checksum_sha256: str | None
    metadata: dict[str, Any] | None
    attempts: int
    crashes: int = Field(
        default=0, description="OCR attempts that ended with no result (a worker died or "
        "hung); not counted in attempts")
    last_error: str | None
    ocr: dict[str, Any] | None
    deadline_at: datetime | None
    state_entered_at: datetime
    created_at: datetime
    updated_at: datetime
    tasks: dict[str, dict[str, str]] | None = Field(
        default=None, description="per step (ocr, embed, index): state, attempt, error")
    indexed_version: int | None = Field(
        default=None, description="the version the search view holds")
    searchable: bool | None = Field(
        default=None,
        description="embedded, and the search view holds exactly the current version")
    unavailable: list[str] = Field(
        default_factory=list,
        description="what could not be read for this answer (`task_cache`, `search`): its "
                    "fields are null, the rest is current")


class ImagePage(BaseModel):
    """One page of a listing; pass `next_cursor` as `cursor` for the next."""

    items: list[ImageView]
    next_cursor: str | None


class SearchPage(BaseModel):
    """Results of `GET /v1/search`, best first."""

    mode: str
    total: int
    items: list[SearchHit]
