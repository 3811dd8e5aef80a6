"""The search view's index made against the real search server: search projectors starting
together each find it made, whichever of them made it."""

from __future__ import annotations

import threading
import uuid

import pytest
from elasticsearch import Elasticsearch

from outbox_app.settings import ProjectorSettings
from outbox_app.views.search_index import ensure_index


@pytest.mark.parametrize("projectors", [2, 6])
def test_search_projectors_starting_together_all_get_the_index(projectors):
    settings = ProjectorSettings(es_index=f"race{uuid.uuid4().hex[:8]}-images")
    clients = [Elasticsearch(settings.es_url) for _ in range(projectors)]
    start = threading.Barrier(projectors)
    got: list[str | BaseException] = []

    def make(es: Elasticsearch) -> None:
        start.wait()
        try:
            got.append(ensure_index(es, settings))
        except BaseException as exc:  # reported by the assertion below
            got.append(exc)

    threads = [threading.Thread(target=make, args=(es,)) for es in clients]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert got == [settings.es_index] * projectors
        assert list(clients[0].indices.get_alias(name=settings.es_index)) == \
            [f"{settings.es_index}-v1"]
    finally:
        for index in clients[0].indices.get(index=f"{settings.es_index}-*"):
            clients[0].indices.delete(index=index)
        for es in clients:
            es.close()
