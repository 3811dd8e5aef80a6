"""`outbox project ocr` as a child process, and killing it while it recognises one chosen
image: how the tests prove that a worker's crash is not charged to the images it was
reading."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.engine import Engine

from outbox_app.sample_images import text_image
from outbox_images.tables import image_table
from tests.db_roles import APP_URL, role_url
from tests.pipeline_harness import wait_for
from tests.relay_harness import ROOT, free_port, settings_env

# Recognised in about 1.5 s here (60 lines; 2 lines take 0.3 s): a kill sent on its
# `ocr_engine_run` line lands during its recognition, by a wide margin.
SLOW_LINES = [f"Line {i} of a long receipt, item {i * 7} total {i * 3}.50" for i in range(60)]


def slow_image() -> bytes:
    """An image whose recognition takes long enough for a kill to land during it."""
    return text_image(SLOW_LINES)


class OcrProcess:
    """`outbox project ocr` as a child process (the application's role), its log in a file
    of its own per start."""

    def __init__(self, settings, log_dir: Path, **env: str) -> None:
        self._env = {**os.environ, **settings_env(settings),
                     "OUTBOX_DATABASE_URL": role_url(APP_URL), **env}
        self._dir = log_dir
        self.logs: list[Path] = []
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        path = self._dir / f"ocr-{len(self.logs)}.log"
        self.logs.append(path)
        with open(path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "outbox.cli", "project", "ocr", "--metrics-port",
                 str(free_port())], env=self._env, cwd=ROOT, stdout=log,
                stderr=subprocess.STDOUT)

    def events(self, name: str) -> list[dict]:
        out = []
        for path in self.logs:
            for line in path.read_text(errors="replace").splitlines():
                if f'"{name}"' in line and line.startswith("{"):
                    out.append(json.loads(line))
        return out

    def runs_of(self, image_id: str) -> int:
        """How many recognitions of `image_id` started, over every start of the process."""
        return sum(e.get("image") == image_id for e in self.events("ocr_engine_run"))

    def kill_during(self, image_id: str, timeout_s: float = 120) -> None:
        """Wait for the next recognition of `image_id` to start and SIGKILL the process
        during it."""
        runs = self.runs_of(image_id)
        wait_for(lambda: self.runs_of(image_id) > runs, timeout_s=timeout_s,
                 interval_s=0.02, what=f"a recognition of {image_id} to kill")
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(30)


def image_row(engine: Engine, image_id: str) -> dict:
    """The image's row: state, attempts, crashes, last_error."""
    t = image_table.c
    with engine.connect() as conn:
        row = conn.execute(select(t.state, t.attempts, t.crashes, t.last_error).where(
            t.id == uuid.UUID(image_id))).mappings().one()
    return dict(row)
