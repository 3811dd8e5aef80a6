"""`GET /v1/search`: text, vector and hybrid search over the search view, org-scoped."""

from typing import Annotated

from fastapi import APIRouter, Depends, Header, Query

from outbox_app.api.errors import ApiError
from outbox_app.api.images import ApiContext
from outbox_app.api.schemas import SearchPage
from outbox_app.views.search_reader import SearchMode, SearchUnavailable


def search_router(ctx: ApiContext) -> APIRouter:
    """The search route bound to `ctx`."""
    router = APIRouter(prefix="/v1", tags=["search"])

    def org_id(authorization: Annotated[str | None, Header()] = None) -> str:
        return ctx.keys.org_for(authorization)

    @router.get("/search", response_model=SearchPage)
    def search(
        org: Annotated[str, Depends(org_id)],
        q: Annotated[str, Query(min_length=1, max_length=500)],
        mode: SearchMode = SearchMode.HYBRID,
        limit: Annotated[int, Query(ge=1, le=50)] = 10,
        offset: Annotated[int, Query(ge=0, le=1000)] = 0,
    ) -> SearchPage:
        """Images of the caller's org matching `q`: by OCR text and metadata (`text`), by
        meaning (`vector`), or both fused by reciprocal rank (`hybrid`)."""
        try:
            ranked = ctx.search.search(org, q, mode, offset + limit)
        except SearchUnavailable as exc:
            raise ApiError(503, "search_unavailable", str(exc)) from exc
        page = ranked[offset:offset + limit]
        return SearchPage(mode=mode.value, total=len(ranked), items=page)

    return router
