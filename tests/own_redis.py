"""A redis-server of a test's own, for faults the shared one must not suffer."""

from __future__ import annotations

import socket
import subprocess

import redis

from tests.pipeline_harness import wait_for


class OwnRedis:
    """A redis-server of the test's own on 127.0.0.1, started and stopped by its PID."""

    def __init__(self, *options: str) -> None:
        """`options`: more redis-server arguments (e.g. "--maxmemory-policy", "allkeys-lru")."""
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.proc: subprocess.Popen | None = None
        self.options = options

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", *self.options], stdout=subprocess.DEVNULL)
        wait_for(self._pings, timeout_s=10, interval_s=0.05, what="redis up")

    def _pings(self) -> bool:
        try:
            return bool(redis.Redis(port=self.port, socket_connect_timeout=0.2).ping())
        except redis.ConnectionError:
            return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
