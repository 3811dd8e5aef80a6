"""The search view's read side: text, vector and hybrid queries, org-scoped, and which
version of an image the view holds. Callers get hits, never Elasticsearch field names."""

from __future__ import annotations

from collections.abc import Callable
from enum import StrEnum
from typing import Any

from elastic_transport import TransportError
from elasticsearch import ApiError, Elasticsearch, NotFoundError
from pydantic import BaseModel

from outbox_images.policy import ImageState

RRF_K = 60  # reciprocal rank fusion constant (Cormack et al.)


class SearchMode(StrEnum):
    """How a query is matched: words, meaning, or both fused."""

    TEXT = "text"
    VECTOR = "vector"
    HYBRID = "hybrid"


class SearchUnavailable(Exception):
    """The view cannot answer: not built yet, or its server is unreachable."""


class SearchHit(BaseModel):
    """One image found, with the fields a result list shows."""

    id: str
    score: float
    state: str
    version: int
    title: str | None
    ocr_text: str | None


class SearchReader:
    """Queries the view behind alias `index`; `query_vector` embeds a query text."""

    def __init__(self, es: Elasticsearch, index: str,
                 query_vector: Callable[[str], list[float]]) -> None:
        self._es = es
        self._index = index
        self._query_vector = query_vector

    def search(self, org: str, q: str, mode: SearchMode, size: int) -> list[SearchHit]:
        """The best `size` images of `org` for `q`, best first (hybrid: fused by reciprocal
        rank). Raises SearchUnavailable when the view cannot answer."""
        try:
            if mode is SearchMode.TEXT:
                ranked = [(h, h["_score"]) for h in self._text(org, q, size)]
            elif mode is SearchMode.VECTOR:
                ranked = [(h, h["_score"]) for h in self._vector(org, q, size)]
            else:
                fused: dict[str, tuple[dict[str, Any], float]] = {}
                for hits in (self._text(org, q, size), self._vector(org, q, size)):
                    for rank, h in enumerate(hits):
                        prev = fused.get(h["_id"], (h, 0.0))
                        fused[h["_id"]] = (prev[0], prev[1] + 1.0 / (RRF_K + rank + 1))
                ranked = sorted(fused.values(), key=lambda x: -x[1])
        except NotFoundError as exc:
            raise SearchUnavailable("the search view is not built yet") from exc
        except TransportError as exc:
            raise SearchUnavailable("the search service is unreachable") from exc
        except ApiError as exc:  # overloaded (429), unavailable (5xx), or refusing (400)
            raise SearchUnavailable(f"the search service answered {exc.meta.status}") from exc
        return [_hit(h, score) for h, score in ranked]

    def indexed_version(self, image_id: str, org_id: str) -> int | None:
        """The version of the image the view holds (None when it holds none for this org, or
        when the search service cannot be reached: the view is then not known to hold it)."""
        try:
            got = self._es.get(index=self._index, id=image_id, source_includes=["org_id"])
        except (NotFoundError, TransportError):
            return None
        if got["_source"].get("org_id") != org_id:
            return None
        return int(got["_version"])

    @staticmethod
    def _filters(org: str) -> dict[str, Any]:
        return {"filter": [{"term": {"org_id": org}}],
                "must_not": [{"term": {"state": ImageState.DELETED.value}}]}

    def _text(self, org: str, q: str, size: int) -> list[dict[str, Any]]:
        query = {"bool": {"must": [{"multi_match": {
            "query": q, "fields": ["title^2", "description", "ocr_text", "tags"]}}],
            **self._filters(org)}}
        return self._es.search(index=self._index, query=query, size=size,
                               source_excludes=["vector"])["hits"]["hits"]

    def _vector(self, org: str, q: str, size: int) -> list[dict[str, Any]]:
        knn = {"field": "vector", "query_vector": self._query_vector(q), "k": size,
               "num_candidates": max(50, 2 * size), "filter": {"bool": self._filters(org)}}
        return self._es.search(index=self._index, knn=knn, size=size,
                               source_excludes=["vector"])["hits"]["hits"]


def _hit(h: dict[str, Any], score: float) -> SearchHit:
    src = h["_source"]
    return SearchHit(id=h["_id"], score=round(score, 6), state=src["state"],
                     version=src["version"], title=src.get("title"), ocr_text=src.get("ocr_text"))
