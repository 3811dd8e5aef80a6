"""A SERVER span per HTTP request while tracing is on (an ASGI middleware).

The span is a child of the request's W3C `traceparent` (and `tracestate`), and is current
while the route runs: an image created by a request carrying a `traceparent` keeps that
trace, and its first event names the request's span as its parent (`images/store.py`). Off,
the middleware passes requests straight through.
"""

from __future__ import annotations

from opentelemetry.trace import SpanKind, Status, StatusCode
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from outbox import tracing

_PROPAGATED = {b"traceparent", b"tracestate"}


class RequestSpans:
    """Wraps each HTTP request in a span named after its method and route."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        tracer = tracing.tracer()
        if scope["type"] != "http" or tracer is None:
            await self.app(scope, receive, send)
            return
        carrier = {name.decode("latin-1"): value.decode("latin-1")
                   for name, value in scope["headers"] if name in _PROPAGATED}
        method = scope["method"]
        status: list[int] = []

        async def send_status(message: Message) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])
            await send(message)

        with tracer.start_as_current_span(
                method, context=tracing.context_from_headers(carrier), kind=SpanKind.SERVER,
                attributes={"http.request.method": method, "url.path": scope["path"]},
        ) as span:
            try:
                await self.app(scope, receive, send_status)
            finally:
                # The route is known once routing ran: the span is named after its template.
                route = getattr(scope.get("route"), "path", None)
                if route is not None:
                    span.update_name(f"{method} {route}")
                    span.set_attribute("http.route", route)
                if status:
                    span.set_attribute("http.response.status_code", status[0])
                    if status[0] >= 500:
                        span.set_status(Status(StatusCode.ERROR))
