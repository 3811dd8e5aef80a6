"""Structured logs (JSON lines via structlog), Prometheus metrics and a health endpoint.

Every long-running process calls `configure_logging` once; the relay and projector processes
serve `/metrics` and `/healthz` with `ObservabilityServer` (the HTTP API serves its own).
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import structlog
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest


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


class ObservabilityServer:
    """`/metrics` (Prometheus text format) and `/healthz` on a background thread."""

    def __init__(self, host: str, port: int, health: Callable[[], dict[str, object]]) -> None:
        self._health = health
        handler = self._handler()
        self._server = ThreadingHTTPServer((host, port), handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def port(self) -> int:
        """The bound port (useful with port 0)."""
        return self._server.server_address[1]

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        health = self._health

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path == "/metrics":
                    self._send(200, generate_latest(), CONTENT_TYPE_LATEST)
                elif self.path == "/healthz":
                    report = health()
                    status = 200 if report.get("status") == "ok" else 503
                    self._send(status, json.dumps(report).encode(), "application/json")
                else:
                    self._send(404, b'{"error": {"code": "not_found"}}', "application/json")

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
    health: Callable[[], dict[str, object]],
    host: str,
    port: int,
    run: Callable[[], int | None],
) -> int:
    """Run a long-lived process: SIGTERM/SIGINT set `stop` (the process then finishes its
    batch and returns), `/metrics` and `/healthz` are served on host:port meanwhile."""
    log = structlog.get_logger(__name__)

    def _stop(signum: int, _frame: object) -> None:
        log.info("signal_received", signal=signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    server = ObservabilityServer(host, port, health)
    server.start()
    try:
        return run() or 0
    finally:
        server.stop()
