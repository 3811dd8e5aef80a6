"""The search view's index: its mapping, the alias that names it, and the document an image
event becomes."""

from __future__ import annotations

from typing import Any

from elasticsearch import BadRequestError, Elasticsearch

from outbox_app.settings import ProjectorSettings

VECTOR_DIMS = 384


def mapping() -> dict[str, Any]:
    """Fields of the search view; `cjk` bigrams make Chinese text searchable."""
    text_cjk = {"type": "text", "analyzer": "cjk"}
    return {
        "dynamic": False,
        "properties": {
            "org_id": {"type": "keyword"},
            "state": {"type": "keyword"},
            "version": {"type": "long"},
            "filename": {"type": "keyword"},
            "title": text_cjk,
            "description": text_cjk,
            "tags": {"type": "keyword"},
            "language": {"type": "keyword"},
            "ocr_text": text_cjk,
            "ocr_language": {"type": "keyword"},
            "embedding_model": {"type": "keyword"},
            "vector": {"type": "dense_vector", "dims": VECTOR_DIMS, "index": True,
                       "similarity": "cosine"},
            "updated_at": {"type": "date"},
        },
    }


def ensure_index(es: Elasticsearch, settings: ProjectorSettings) -> str:
    """Make the alias `es_index` point at a concrete index (created when absent)."""
    alias = settings.es_index
    if es.indices.exists_alias(name=alias):
        return alias
    concrete = f"{alias}-v1"
    if not es.indices.exists(index=concrete):
        try:
            create_index(es, concrete, complete=True)
        except BadRequestError as exc:
            # Another search projector made it between the check and the create.
            if exc.error != "resource_already_exists_exception":
                raise
    es.indices.put_alias(index=concrete, name=alias)
    return alias


def create_index(es: Elasticsearch, name: str, complete: bool) -> None:
    """A concrete index with the view's mapping; `complete` is False while a rebuild fills
    it (recorded in the mapping's `_meta`, so an interrupted rebuild finds its index)."""
    es.indices.create(index=name, mappings={**mapping(), "_meta": {"complete": complete}})


def is_complete(es: Elasticsearch, name: str) -> bool:
    """Whether `name` was fully built (indices made before `_meta` existed count as so)."""
    meta = es.indices.get_mapping(index=name)[name]["mappings"].get("_meta", {})
    return bool(meta.get("complete", True))


def mark_complete(es: Elasticsearch, name: str) -> None:
    """Record that `name` holds the whole view."""
    es.indices.put_mapping(index=name, meta={"complete": True})


def aliased_indices(es: Elasticsearch, alias: str) -> list[str]:
    """The concrete indices behind `alias` (none when it does not exist)."""
    if not es.indices.exists_alias(name=alias):
        return []
    return sorted(es.indices.get_alias(name=alias))


def view_document(payload: dict[str, Any]) -> dict[str, Any]:
    """The search document of an image event's payload (its full current document)."""
    meta = payload.get("metadata") or {}
    ocr = payload.get("ocr") or {}
    emb = payload.get("embedding") or {}
    doc = {
        "org_id": payload["org_id"],
        "state": payload["state"],
        "version": payload["version"],
        "filename": payload.get("filename"),
        "title": meta.get("title"),
        "description": meta.get("description"),
        "tags": meta.get("tags") or [],
        "language": meta.get("language"),
        "ocr_text": ocr.get("text"),
        "ocr_language": ocr.get("language"),
        "embedding_model": emb.get("model"),
        "updated_at": payload.get("updated_at"),
    }
    if emb.get("vector"):
        doc["vector"] = emb["vector"]
    return doc
