"""Structured logs (JSON lines via structlog), Prometheus metrics, liveness and readiness.

Every long-running process calls `configure_logging` once; the relay, projector and
reconciler processes serve `/metrics`, `/healthz` and `/readyz` with `ObservabilityServer`
(the HTTP API serves its own).

- `/healthz` is liveness: 200 while the process runs its main loop, whatever its
  dependencies do (an orchestrator restarting every process during a broker outage would
  only add to it); 503 once it is stopping or its main loop is stalled. The body is the
  process's health report (its `status` says `failing`, `sink_unavailable`... as before).
- They listen on `--metrics-host` when given, else on the `metrics_host` setting
  (`OUTBOX_METRICS_HOST`, 127.0.0.1 by default; 0.0.0.0 in a container).
- `/readyz` is readiness: 200 only while the process is connected to what it needs, else 503
  with the report naming what is missing (`missing`, and a check per dependency with its
  `status` and a short `code`). Neither body carries an error's text (it can name a user or
  a host): a change of a dependency's state is logged once, with the text.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import structlog
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from outbox.readiness import PublishedReadiness, missing
from outbox.settings import Settings
from outbox.tracing import shutdown_tracing


def configure_logging(service: str, level: str = "INFO") -> None:
    """JSON log lines on stderr for structlog and stdlib loggers alike (uvicorn, kafka...)."""
    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                structlog.processors.JSONRenderer(),
            ],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # At DEBUG, botocore logs each request's SigV4 Authorization header (replayable for that
    # request): never below INFO.
    logging.getLogger("botocore").setLevel(max(logging.INFO, root.level))
    structlog.contextvars.bind_contextvars(service=service)


Report = dict[str, Any]


def metrics_host(given: str | None, settings: Settings) -> str:
    """The address to serve /metrics, /healthz and /readyz on: `--metrics-host` when given
    on the command line, else the `metrics_host` setting."""
    return given or settings.metrics_host


class ObservabilityServer:
    """`/metrics` (Prometheus text format), `/healthz` and `/readyz` on a background thread.

    `health`: the process's report; `unlive`: why the process is not alive (None while it
    is); `ready`: the readiness report, whose `ready` decides 200 or 503 (no `/readyz`
    without it), served as `PublishedReadiness` shows it."""

    def __init__(self, host: str, port: int, health: Callable[[], Report],
                 ready: Callable[[], Report] | None = None,
                 unlive: Callable[[], str | None] = lambda: None) -> None:
        self._health = health
        self._ready = ready
        self._unlive = unlive
        handler = self._handler()
        self._server = ThreadingHTTPServer((host, port), handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def port(self) -> int:
        """The bound port (useful with port 0)."""
        return self._server.server_address[1]

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        health, ready, unlive = self._health, self._ready, self._unlive
        published = PublishedReadiness()

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path == "/metrics":
                    self._send(200, generate_latest(), CONTENT_TYPE_LATEST)
                elif self.path == "/healthz":
                    report, reason = health(), unlive()
                    if reason is not None:
                        report = {**report, "live": False, "reason": reason}
                    self._json(200 if reason is None else 503, report)
                elif self.path == "/readyz" and ready is not None:
                    report = published.publish(ready())
                    self._json(200 if report["ready"] else 503, report)
                else:
                    self._send(404, b'{"error": {"code": "not_found"}}', "application/json")

            def _json(self, status: int, report: Report) -> None:
                self._send(status, json.dumps(report, default=str).encode(),
                           "application/json")

            def _send(self, status: int, body: bytes, ctype: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *_: object) -> None:  # scrapes are not worth a log line
                return

        return Handler

    def start(self) -> None:
        """Serve in the background."""
        self._thread.start()

    def stop(self) -> None:
        """Stop serving and close the socket."""
        self._server.shutdown()
        self._server.server_close()


def serve_until_stopped(
    stop: threading.Event,
    health: Callable[[], Report],
    host: str,
    port: int,
    run: Callable[[], int | None],
    *,
    ready: Callable[[], Report] | None = None,
    stalled: Callable[[], str | None] = lambda: None,
) -> int:
    """Run a long-lived process: SIGTERM/SIGINT set `stop` (the process then finishes its
    batch and returns), `/metrics`, `/healthz` and `/readyz` are served on host:port
    meanwhile. Liveness fails once `stop` is set or `stalled()` names a reason; a stopping
    process is not ready either. Buffered spans are exported before it returns."""
    log = structlog.get_logger(__name__)

    def unlive() -> str | None:
        return "stopping" if stop.is_set() else stalled()

    def readiness() -> Report:
        assert ready is not None
        report = ready()
        if not stop.is_set():
            return report
        return {**report, "status": "not_ready", "ready": False,
                "missing": [*report["missing"], "running"],
                "checks": {**report["checks"], "running": missing("stopping")}}

    def _stop(signum: int, _frame: object) -> None:
        log.info("signal_received", signal=signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    server = ObservabilityServer(host, port, health, readiness if ready else None, unlive)
    server.start()
    try:
        return run() or 0
    finally:
        server.stop()
        shutdown_tracing()
