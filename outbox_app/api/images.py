"""`/v1/images`: the upload lifecycle over HTTP."""


import base64
import binascii
import json
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

import elasticsearch
import redis
import structlog
from botocore.client import BaseClient
from fastapi import APIRouter, Depends, Header, Query, Response
from sqlalchemy import select, tuple_
from sqlalchemy.engine import Engine, RowMapping

from outbox_app.api.auth import ApiKeys
from outbox_app.api.errors import ApiError
from outbox_app.api.schemas import ImageCreate, ImageCreated, ImageMetadata, ImagePage, ImageView
from outbox_app.settings import AppSettings
from outbox_app.trace import ImageTrace
from outbox_app.upload_verification import ALLOWED_CONTENT_TYPES, UploadMissing
from outbox_app.uploads import presigned_post, settle_upload
from outbox_app.views.search_reader import SearchReader
from outbox_app.views.task_cache import TaskCache
from outbox_images.policy import ImageState
from outbox_images.storage import object_key
from outbox_images.store import StaleVersion, create_image, delete, load_image, transition
from outbox_images.tables import image_table

MAX_URL_TTL_S = 15 * 60

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class ApiContext:
    """What the routes need: configuration and long-lived clients."""

    settings: AppSettings
    engine: Engine
    s3: BaseClient
    presigner: BaseClient  # signs the URLs clients use (the public endpoint)
    keys: ApiKeys
    search: SearchReader
    tasks: TaskCache
    trace: ImageTrace


def _view(row: RowMapping) -> ImageView:
    return ImageView.model_validate(dict(row))


def _if_match(value: str | None) -> int | None:
    if value is None:
        return None
    try:
        return int(value.strip().strip('"'))
    except ValueError as exc:
        raise ApiError(400, "invalid_if_match", "If-Match must be an image version") from exc


def _check_version(row: RowMapping, expected: int | None) -> None:
    if expected is not None and expected != row["version"]:
        raise StaleVersion(f"image is at version {row['version']}, not {expected}")


def _encode_cursor(row: RowMapping) -> str:
    raw = json.dumps([row["created_at"].isoformat(), str(row["id"])]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[datetime, uuid.UUID]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        created, image_id = json.loads(raw)
        return datetime.fromisoformat(created), uuid.UUID(image_id)
    except (binascii.Error, ValueError, TypeError, AttributeError) as exc:
        raise ApiError(400, "invalid_cursor", "cursor is not one this API issued") from exc


def image_router(ctx: ApiContext) -> APIRouter:
    """The image routes bound to `ctx`."""
    router = APIRouter(prefix="/v1/images", tags=["images"])
    settings, engine = ctx.settings, ctx.engine

    def org_id(authorization: Annotated[str | None, Header()] = None) -> str:
        return ctx.keys.org_for(authorization)

    Org = Annotated[str, Depends(org_id)]

    @router.post("", status_code=201, response_model=ImageCreated)
    def create(body: ImageCreate, org: Org,
               traceparent: Annotated[str | None, Header()] = None) -> ImageCreated:
        """Declare an upload: the resource starts in `requested` with a presigned POST bound
        to a key derived from org and id only. Every event of the image continues the trace
        of the request's `traceparent`."""
        if body.content_type not in ALLOWED_CONTENT_TYPES:
            raise ApiError(415, "unsupported_media_type",
                           f"content_type must be one of {sorted(ALLOWED_CONTENT_TYPES)}")
        if body.size > settings.max_upload_bytes:
            raise ApiError(413, "too_large",
                           f"size exceeds the maximum of {settings.max_upload_bytes} bytes")
        image_id = uuid.uuid4()
        key = object_key(org, str(image_id))
        ttl = min(settings.upload_url_ttl_s, MAX_URL_TTL_S)
        post = presigned_post(ctx.presigner, settings, key=key, content_type=body.content_type,
                              size=body.size, expires_in=ttl)
        expires_at = datetime.now(UTC) + timedelta(seconds=ttl)
        metadata = body.metadata.model_dump(exclude_none=True) if body.metadata else None
        with engine.begin() as conn:
            row = create_image(conn, settings, image_id=image_id, org_id=org,
                               filename=body.filename, content_type=body.content_type,
                               declared_size=body.size, object_key=key,
                               checksum_sha256=body.checksum_sha256, metadata=metadata,
                               traceparent=traceparent)
        return ImageCreated(id=image_id, state=row["state"], version=row["version"],
                            upload_url=post["url"], upload_method="POST", upload_headers={},
                            upload_fields=post["fields"], expires_at=expires_at)

    @router.post("/{image_id}/uploaded", response_model=ImageView)
    def confirm_upload(image_id: uuid.UUID, org: Org) -> ImageView:
        """The client says the upload finished: verify the object, then move to `uploaded`
        (and on to `ocr_pending` when metadata is present) or to `rejected`. Idempotent."""
        with engine.begin() as conn:
            # The row lock makes concurrent confirmations of one image take turns.
            row = load_image(conn, org, image_id, for_update=True)
            if row["state"] == ImageState.REJECTED:
                raise ApiError(409, "upload_rejected", row["last_error"] or "upload rejected")
            if row["state"] != ImageState.REQUESTED:
                if row["object_size"] is not None:
                    return _view(row)  # already confirmed
                raise ApiError(409, "illegal_transition",
                               f"image is {row['state']}; it cannot receive an upload")
            try:
                row, refused = settle_upload(conn, ctx.s3, settings, row)
            except UploadMissing as exc:
                raise ApiError(409, "upload_missing", str(exc)) from exc
        if refused is not None:  # raised after the commit: the rejection is recorded
            raise ApiError.rejected_upload(refused)
        return _view(row)

    @router.put("/{image_id}/metadata", response_model=ImageView)
    def put_metadata(
        image_id: uuid.UUID,
        body: ImageMetadata,
        org: Org,
        if_match: Annotated[str | None, Header()] = None,
    ) -> ImageView:
        """Set the metadata, before or after the upload; with both present the image moves
        to `ocr_pending` in the same transaction, and an embedded image goes back to
        `embedding_pending` for a vector of the new text. `If-Match: <version>` guards the
        write."""
        expected = _if_match(if_match)
        with engine.begin() as conn:
            row = load_image(conn, org, image_id)
            _check_version(row, expected)
            row = transition(conn, row, ImageState(row["state"]), settings,
                             {"metadata": body.model_dump(exclude_none=True)})
            if row["state"] == ImageState.UPLOADED:
                row = transition(conn, row, ImageState.OCR_PENDING, settings)
            elif row["state"] == ImageState.EMBEDDED:
                row = transition(conn, row, ImageState.EMBEDDING_PENDING, settings)
        return _view(row)

    @router.get("/{image_id}", response_model=ImageView)
    def get_image(image_id: uuid.UUID, org: Org, response: Response) -> ImageView:
        """The resource (state, version, metadata, deadlines), its task states, and whether
        the search view holds its current version. A view that cannot be read right now is
        named in `unavailable`, its fields null: the read itself needs the database only."""
        with engine.connect() as conn:
            row = load_image(conn, org, image_id)
        response.headers["ETag"] = f'"{row["version"]}"'
        view = _view(row)
        # The image itself comes from the database; the views only add to it, so an outage
        # of one leaves its fields out (named in `unavailable`) instead of failing the read.
        try:
            view.tasks = ctx.tasks.read(str(image_id))
        except redis.RedisError as exc:
            log.warning("task_cache_unavailable", image_id=str(image_id), error=str(exc)[:200])
            view.unavailable.append("task_cache")
        try:
            view.indexed_version = ctx.search.indexed_version(str(image_id), org)
        except elasticsearch.ApiError as exc:  # an overloaded or refusing search server
            log.warning("search_unavailable", image_id=str(image_id), error=str(exc)[:200])
            view.unavailable.append("search")
            return view
        # Truthful: fully processed (OCR text and vector exist) and the view holds exactly
        # the database's version of it.
        view.searchable = (row["state"] == ImageState.EMBEDDED
                           and view.indexed_version == row["version"])
        return view

    @router.get("/{image_id}/history")
    def history(image_id: uuid.UUID, org: Org) -> dict[str, Any]:
        """The image's journey: every state change (time, event id, trace context, Kafka
        topic and partition), what each view holds now, and the object in the bucket."""
        return ctx.trace.journey(image_id, org)

    @router.delete("/{image_id}", response_model=ImageView)
    def delete_image(
        image_id: uuid.UUID, org: Org, if_match: Annotated[str | None, Header()] = None
    ) -> ImageView:
        """Move the image to `deleted`; downstream cleans up from the event. Idempotent."""
        expected = _if_match(if_match)
        with engine.begin() as conn:
            row = load_image(conn, org, image_id)
            if row["state"] != ImageState.DELETED:
                _check_version(row, expected)
                row = delete(conn, row, settings)
        return _view(row)

    @router.get("", response_model=ImagePage)
    def list_images(
        org: Org,
        state: ImageState | None = None,
        limit: Annotated[int, Query(ge=1, le=100)] = 20,
        cursor: Annotated[str | None, Query(max_length=200)] = None,
    ) -> ImagePage:
        """Images of the caller's org, oldest first, keyset-paginated."""
        t = image_table.c
        stmt = select(image_table).where(t.org_id == org)
        if state is not None:
            stmt = stmt.where(t.state == state)
        if cursor is not None:
            created, last_id = _decode_cursor(cursor)
            stmt = stmt.where(tuple_(t.created_at, t.id) > tuple_(created, last_id))
        stmt = stmt.order_by(t.created_at, t.id).limit(limit + 1)
        with engine.connect() as conn:
            rows = conn.execute(stmt).mappings().all()
        page = rows[:limit]
        more = len(rows) > limit
        return ImagePage(items=[_view(r) for r in page],
                         next_cursor=_encode_cursor(page[-1]) if more else None)

    return router


