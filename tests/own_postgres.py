"""A PostgreSQL server of a test's own, for server settings the shared one must not have."""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path


def _pg_bin() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda d: int(d.split("/")[4]))
    return Path(found[-1])


class OwnPostgres:
    """initdb + postgres on a free 127.0.0.1 port with `settings` added to postgresql.conf,
    trust authentication, stopped by pg_ctl (its own PID file)."""

    def __init__(self, settings: dict[str, str]) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        # Not under pytest's tmp_path: the server runs as `postgres` when the tests run as
        # root, and that user cannot enter root's 0700 temporary directories.
        self.dir = Path(tempfile.mkdtemp(prefix="outbox-own-pg-"))
        self.settings = settings

    @property
    def url(self) -> str:
        """The superuser's SQLAlchemy URL."""
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str) -> None:
        as_owner = ["runuser", "-u", "postgres", "--"] if os.getuid() == 0 else []
        subprocess.run([*as_owner, *args], check=True, cwd="/", stdout=subprocess.DEVNULL,
                       stderr=subprocess.PIPE)

    def start(self) -> None:
        if os.getuid() == 0:
            shutil.chown(self.dir, "postgres", "postgres")
        data = self.dir / "data"
        self._run(str(_pg_bin() / "initdb"), "-D", str(data), "-U", "postgres",
                  "--auth=trust", "-E", "UTF8", "--locale=C.UTF-8")
        conf = {"listen_addresses": "'127.0.0.1'", "port": str(self.port),
                "unix_socket_directories": f"'{self.dir}'", **self.settings}
        with (data / "postgresql.conf").open("a") as f:
            f.writelines(f"{k} = {v}\n" for k, v in conf.items())
        self._run(str(_pg_bin() / "pg_ctl"), "-D", str(data), "-l", str(self.dir / "log"),
                  "-w", "-t", "60", "start")

    def stop(self) -> None:
        if (self.dir / "data" / "postmaster.pid").exists():
            self._run(str(_pg_bin() / "pg_ctl"), "-D", str(self.dir / "data"), "-m",
                      "immediate", "-w", "stop")
        shutil.rmtree(self.dir, ignore_errors=True)
