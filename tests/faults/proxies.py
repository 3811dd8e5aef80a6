"""Stand-ins for faults a real server cannot be made to produce on demand, each in front of
the real server."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import requests


class CuttableTcpProxy:
    """Forwards 127.0.0.1:port to a real server; `cut()` drops every connection and refuses
    new ones until `restore()`. It stands in for the bucket going unreachable: stopping the
    real object store would also stop the broker, which keeps its log in it."""

    def __init__(self, target_port: int) -> None:
        self._target = target_port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._cut = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def cut(self) -> None:
        with self._lock:
            self._cut = True
            for s in self._open:
                s.close()
            self._open.clear()

    def restore(self) -> None:
        with self._lock:
            self._cut = False

    def close(self) -> None:
        self.cut()
        self._listener.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                if self._cut:
                    client.close()
                    continue
                upstream = socket.create_connection(("127.0.0.1", self._target))
                self._open |= {client, upstream}
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while chunk := src.recv(65536):
                dst.sendall(chunk)
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)


class OverloadedSearchProxy:
    """Forwards to a real Elasticsearch, but refuses bulk writes as an overloaded cluster does,
    one refusal per bulk request from `plan` until it is used up: "whole" answers 429 to the
    request, "items" answers 200 with every item rejected (429,
    es_rejected_execution_exception). The real server cannot be made to do this on demand."""

    def __init__(self, upstream: str, plan: list[str]) -> None:
        self.plan = list(plan)
        self.rejected: Counter[str] = Counter()
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _any(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                mode = proxy.next_refusal() if "_bulk" in self.path else None
                if mode is not None:
                    self._reject(mode, body)
                    return
                headers = {k: v for k, v in self.headers.items()
                           if k.lower() not in ("host", "content-length", "connection")}
                got = requests.request(self.command, upstream + self.path, data=body,
                                       headers=headers, timeout=30)
                self._send(got.status_code, got.content,
                           got.headers.get("Content-Type", "application/json"))

            do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = _any

            def _reject(self, mode: str, body: bytes) -> None:
                error = {"type": "es_rejected_execution_exception",
                         "reason": "rejected execution of bulk (queue capacity reached)"}
                if mode == "whole":
                    self._send(429, json.dumps({"error": error, "status": 429}).encode())
                    return
                items, lines = [], [x for x in body.splitlines() if x.strip()]
                i = 0
                while i < len(lines):  # an action line, then its document unless a delete
                    kind, meta = next(iter(json.loads(lines[i]).items()))
                    items.append({kind: {**meta, "status": 429, "error": error}})
                    i += 1 if kind == "delete" else 2
                self._send(200, json.dumps({"took": 1, "errors": True, "items": items}).encode())

            def _send(self, status: int, payload: bytes,
                      content_type: str = "application/json") -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("X-Elastic-Product", "Elasticsearch")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(payload)

            def log_message(self, *_: object) -> None:
                return

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def next_refusal(self) -> str | None:
        """The next refusal of the plan (counted), or None once it is used up."""
        with self._lock:
            if not self.plan:
                return None
            mode = self.plan.pop(0)
            self.rejected[mode] += 1
            return mode

    def close(self) -> None:
        self._server.shutdown()
