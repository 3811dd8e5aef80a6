"""The API's request metrics: `outbox_http_requests_total{method,route,status}` and
`outbox_http_request_duration_seconds{method,route}`."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

from fastapi import FastAPI, Request, Response
from prometheus_client import Counter, Histogram

REQUESTS = Counter("outbox_http_requests_total", "HTTP requests", ["method", "route", "status"])
LATENCY = Histogram("outbox_http_request_duration_seconds", "HTTP request latency",
                    ["method", "route"])


def measure_requests(app: FastAPI) -> None:
    """Count and time every request of `app` by its route template (`unmatched` for none).
    An exception no handler turned into a response is answered 500 by the server, and is
    counted as one."""

    @app.middleware("http")
    async def _measure(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        start = time.perf_counter()
        status = "500"
        try:
            response = await call_next(request)
            status = str(response.status_code)
            return response
        finally:
            route = getattr(request.scope.get("route"), "path", "unmatched")
            REQUESTS.labels(request.method, route, status).inc()
            LATENCY.labels(request.method, route).observe(time.perf_counter() - start)
