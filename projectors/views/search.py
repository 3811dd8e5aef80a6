"""The search view: image events -> Elasticsearch, a pure function of the log.

Every write carries `version_type=external` with the aggregate version, so a redelivered or
older event is refused by Elasticsearch (409), which counts as success. Deleted images are
removed. Writes go in bulk, one action per image (its latest event in the batch).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import structlog
from elasticsearch import Elasticsearch, helpers

from images.policy import ImageState
from outbox.envelope import EventEnvelope
from projectors.settings import ProjectorSettings
from projectors.views.search_index import ensure_index, view_document
from projectors.views.task_cache import TaskCache

log = structlog.get_logger(__name__)


class SearchIndexError(RuntimeError):
    """Elasticsearch refused writes for a reason other than a version conflict."""


class SearchProjector:
    """Projector `search`."""

    name = "search"
    aggregate_types: Sequence[str] = ("image",)

    def __init__(self, settings: ProjectorSettings, es: Elasticsearch, tasks: TaskCache) -> None:
        self._es = es
        self._tasks = tasks
        self._alias = ensure_index(es, settings)

    def apply(self, events: list[EventEnvelope]) -> None:
        """Index (or delete) the latest state of each image in the batch."""
        latest: dict[str, EventEnvelope] = {}
        for e in events:
            if e.aggregate_version is None:
                continue
            cur = latest.get(e.aggregate_id)
            if cur is None or (cur.aggregate_version or 0) < e.aggregate_version:
                latest[e.aggregate_id] = e
        if not latest:
            return
        actions = [self._action(e) for e in latest.values()]
        _, errors = helpers.bulk(self._es, actions, raise_on_error=False, refresh="wait_for")
        real = [x for x in errors if _status(x) not in (409, 404)]
        if real:
            raise SearchIndexError(f"{len(real)} bulk errors, first: {real[0]}")
        for e in latest.values():
            self._tasks.mark_indexed(e)

    def _action(self, e: EventEnvelope) -> dict[str, Any]:
        base = {"_index": self._alias, "_id": e.aggregate_id, "version": e.aggregate_version,
                "version_type": "external"}
        if e.payload.get("state") == ImageState.DELETED:
            return {**base, "_op_type": "delete"}
        return {**base, "_op_type": "index", "_source": view_document(e.payload)}

    def close(self) -> None:
        """Close the client."""
        self._es.close()


def _status(item: dict[str, Any]) -> int:
    return next(iter(item.values())).get("status", 0)
