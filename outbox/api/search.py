"""`GET /v1/search`: text, vector and hybrid search over the search view, org-scoped."""

from enum import StrEnum
from typing import Annotated, Any

from elastic_transport import TransportError
from elasticsearch import NotFoundError
from fastapi import APIRouter, Depends, Header, Query

from outbox.api.errors import ApiError
from outbox.api.images import ApiContext
from outbox.api.schemas import SearchHit, SearchPage
from outbox.image_policy import ImageState
from projectors.embedder import get_embedder

RRF_K = 60  # reciprocal rank fusion constant (Cormack et al.)


class SearchMode(StrEnum):
    """How `q` is matched: words, meaning, or both fused."""

    TEXT = "text"
    VECTOR = "vector"
    HYBRID = "hybrid"


def _hit(h: dict[str, Any], score: float) -> SearchHit:
    src = h["_source"]
    return SearchHit(id=h["_id"], score=round(score, 6), state=src["state"],
                     version=src["version"], title=src.get("title"),
                     ocr_text=src.get("ocr_text"))


def search_router(ctx: ApiContext) -> APIRouter:
    """The search route bound to `ctx`."""
    router = APIRouter(prefix="/v1", tags=["search"])
    settings = ctx.settings

    def org_id(authorization: Annotated[str | None, Header()] = None) -> str:
        return ctx.keys.org_for(authorization)

    def scope(org: str) -> list[dict[str, Any]]:
        return [{"term": {"org_id": org}}]

    def excluded() -> list[dict[str, Any]]:
        return [{"term": {"state": ImageState.DELETED.value}}]

    def text_search(org: str, q: str, size: int) -> list[dict[str, Any]]:
        body = {"bool": {"must": [{"multi_match": {
            "query": q, "fields": ["title^2", "description", "ocr_text", "tags"]}}],
            "filter": scope(org), "must_not": excluded()}}
        return ctx.es.search(index=settings.es_index, query=body, size=size,
                             source_excludes=["vector"])["hits"]["hits"]

    def vector_search(org: str, q: str, size: int) -> list[dict[str, Any]]:
        vector = get_embedder(settings.embedding_model).query(q).tolist()
        knn = {"field": "vector", "query_vector": vector, "k": size,
               "num_candidates": max(50, 2 * size),
               "filter": {"bool": {"filter": scope(org), "must_not": excluded()}}}
        return ctx.es.search(index=settings.es_index, knn=knn, size=size,
                             source_excludes=["vector"])["hits"]["hits"]

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
        size = offset + limit
        try:
            if mode is SearchMode.TEXT:
                ranked = [(h, h["_score"]) for h in text_search(org, q, size)]
            elif mode is SearchMode.VECTOR:
                ranked = [(h, h["_score"]) for h in vector_search(org, q, size)]
            else:
                fused: dict[str, tuple[dict[str, Any], float]] = {}
                for hits in (text_search(org, q, size), vector_search(org, q, size)):
                    for rank, h in enumerate(hits):
                        prev = fused.get(h["_id"], (h, 0.0))
                        fused[h["_id"]] = (prev[0], prev[1] + 1.0 / (RRF_K + rank + 1))
                ranked = sorted(fused.values(), key=lambda x: -x[1])
        except NotFoundError as exc:
            raise ApiError(503, "search_unavailable", "the search view is not built yet") from exc
        except TransportError as exc:
            raise ApiError(503, "search_unavailable", "the search service is unreachable") from exc
        page = ranked[offset:size]
        return SearchPage(mode=mode.value, total=len(ranked),
                          items=[_hit(h, s) for h, s in page])

    return router
