"""The API's request metrics, on an application of their own (no server): every request
is counted by its route template and status, an unhandled error as the 500 it is answered
with, and timed in `outbox_http_request_duration_seconds`."""

from __future__ import annotations

import uuid

from fastapi import FastAPI
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY

from outbox_app.api.request_metrics import measure_requests


def _count(route: str, status: str) -> float:
    return REGISTRY.get_sample_value(
        "outbox_http_requests_total", {"method": "GET", "route": route, "status": status}) or 0.0


def _timed(route: str) -> float:
    return REGISTRY.get_sample_value("outbox_http_request_duration_seconds_count",
                                     {"method": "GET", "route": route}) or 0.0


def test_requests_are_counted_by_route_and_status_and_an_unhandled_error_as_500():
    prefix = f"/t{uuid.uuid4().hex[:8]}"  # routes of this test only
    app = FastAPI()
    measure_requests(app)

    @app.get(prefix + "/items/{item}")
    def item(item: str) -> dict[str, str]:
        return {"item": item}

    @app.get(prefix + "/broken")
    def broken() -> None:
        raise RuntimeError("the database went away")

    client = TestClient(app, raise_server_exceptions=False)
    assert client.get(f"{prefix}/items/1").status_code == 200
    assert client.get(f"{prefix}/items/2").status_code == 200
    assert client.get(f"{prefix}/broken").status_code == 500

    assert _count(prefix + "/items/{item}", "200") == 2.0
    assert _count(prefix + "/broken", "500") == 1.0
    assert _timed(prefix + "/items/{item}") == 2.0
    assert _timed(prefix + "/broken") == 1.0
