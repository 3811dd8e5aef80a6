"""The status page: `GET /status` and its script and style sheet, and `GET /v1/status`, the
snapshot of `outbox_app.status` for the caller's org.

A browser sends no `Authorization` header when it navigates, and a key in a URL ends up in
histories and logs, so the page itself holds no data: it asks for the key, keeps it in the
tab's sessionStorage, and reads `/v1/status` and `/v1/search` with the header, every 2
seconds. Its content security policy allows only its own script, style and requests.
"""

from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Response

from outbox_app.api.errors import ApiError
from outbox_app.api.images import ApiContext
from outbox_app.status import StatusCollector, StatusIncomplete

STATIC = Path(__file__).with_name("static")
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
                               "connect-src 'self'; img-src 'self'; base-uri 'none'; "
                               "form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
ASSETS = {"status.html": "text/html; charset=utf-8",
          "status.js": "text/javascript; charset=utf-8",
          "status.css": "text/css; charset=utf-8"}


def status_router(ctx: ApiContext) -> APIRouter:
    """The page, its assets and the org-scoped snapshot, bound to `ctx`."""
    router = APIRouter()
    # Shared by every org and request: the pipeline-wide part is read at most once a second.
    collector = StatusCollector(ctx.settings, ctx.engine, pipeline_ttl_s=1.0)
    assets = {name: (STATIC / name).read_bytes() for name in ASSETS}

    def asset(name: str) -> Response:
        return Response(assets[name], media_type=ASSETS[name], headers=PAGE_HEADERS)

    @router.get("/status", include_in_schema=False)
    def page() -> Response:
        """The status page (a shell: its data comes from `/v1/status` with the key)."""
        return asset("status.html")

    @router.get("/status/status.js", include_in_schema=False)
    def script() -> Response:
        """The page's script."""
        return asset("status.js")

    @router.get("/status/status.css", include_in_schema=False)
    def style() -> Response:
        """The page's style sheet."""
        return asset("status.css")

    def org_id(authorization: Annotated[str | None, Header()] = None) -> str:
        return ctx.keys.org_for(authorization)

    @router.get("/v1/status", tags=["ops"])
    def status(org: Annotated[str, Depends(org_id)]) -> dict[str, Any]:
        """The caller's org: images per state, overdue and failed images, dead letters; and
        the pipeline shared by every org: services, relay position and lag, projector lag
        and throughput. `attention` lists what needs a person; `healthy` is true when
        nothing does."""
        try:
            return collector.snapshot(org)
        except StatusIncomplete as exc:
            raise ApiError(503, "status_unavailable", str(exc)) from exc

    return router
