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

from outbox.envelope import EventEnvelope
from outbox_app.settings import ProjectorSettings
from outbox_app.views.search_index import ensure_index, view_document
from outbox_app.views.task_cache import TaskCache
from outbox_images.policy import ImageState
from projectors.transient_errors import SinkUnavailable

log = structlog.get_logger(__name__)


class SearchIndexError(RuntimeError):
    """Elasticsearch refused writes for a reason other than a version conflict."""


# Per-item failures that say the server cannot take writes now, not that the item is bad.
_UNAVAILABLE = {429, 502, 503, 504}


class SearchProjector:
    """Projector `search`."""

    name = "search"
    aggregate_types: Sequence[str] = ("image",)

    def __init__(self, settings: ProjectorSettings, es: Elasticsearch, tasks: TaskCache | None,
                 index: str | None = None) -> None:
        """Writes to the alias `es_index` (made when absent, at the first batch), or, for a
        rebuild, to the concrete `index` (then the task cache, which describes the live
        view, is left alone)."""
        self._es = es
        self._tasks = tasks
        self._settings = settings
        self._rebuilding = index is not None
        # Resolved at the first batch, not here: a projector started while the search
        # server is down reports not ready and waits, instead of failing at set-up.
        self._index = index

    def apply(self, events: list[EventEnvelope]) -> None:
        """Index (or delete) the latest state of each image in the batch."""
        latest: dict[str, EventEnvelope] = {}
        for e in events:
            if e.aggregate_version is None:
                continue
            cur = latest.get(e.aggregate_id)
            if cur is None or (cur.aggregate_version or 0) < e.aggregate_version:
                latest[e.aggregate_id] = e
        if self._index is None:  # before any position is committed (see view_healing.py)
            self._index = ensure_index(self._es, self._settings)
        if not latest:
            return
        if self._rebuilding and not self._es.indices.exists(index=self._index):
            raise SinkUnavailable(f"the index {self._index} being rebuilt is gone")
        actions = [self._action(e) for e in latest.values()]
        # require_alias: a write never creates an index under the alias's name (with a
        # dynamic mapping) when the alias is missing; it fails and is waited out.
        # Live: a write is searchable when its batch commits. A rebuilt index serves no one
        # until the switch, which refreshes it once.
        _, errors = helpers.bulk(self._es, actions, raise_on_error=False,
                                 refresh=False if self._rebuilding else "wait_for",
                                 require_alias=not self._rebuilding)
        unavailable = [x for x in errors if _status(x) in _UNAVAILABLE or _missing_index(x)]
        if unavailable:
            raise SinkUnavailable(f"{len(unavailable)} bulk items refused for now, first: "
                                  f"{unavailable[0]}")
        real = [x for x in errors if _status(x) not in (409, 404)]
        if real:
            raise SearchIndexError(f"{len(real)} bulk errors, first: {real[0]}")
        if self._tasks is not None:
            for e in latest.values():
                self._tasks.mark_indexed(e)

    def _action(self, e: EventEnvelope) -> dict[str, Any]:
        base = {"_index": self._index, "_id": e.aggregate_id, "version": e.aggregate_version,
                "version_type": "external"}
        if e.payload.get("state") == ImageState.DELETED:
            return {**base, "_op_type": "delete"}
        return {**base, "_op_type": "index", "_source": view_document(e.payload)}

    def close(self) -> None:
        """Close the client."""
        self._es.close()


def _status(item: dict[str, Any]) -> int:
    return next(iter(item.values())).get("status", 0)


def _missing_index(item: dict[str, Any]) -> bool:
    error = next(iter(item.values())).get("error") or {}
    return isinstance(error, dict) and error.get("type") == "index_not_found_exception"
