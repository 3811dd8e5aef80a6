"""A first run from a clone inside a private (mode 0700) directory, as root's home is: the
stack's PostgreSQL must start there, and the user's files stay as they were."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

import psycopg

from tests.relay_harness import ROOT, free_port


def _mode_and_owner(path: Path) -> tuple[int, int, int]:
    st = path.stat()
    return stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid


def test_postgres_starts_from_a_clone_in_a_mode_0700_home(tmp_path):
    home = tmp_path / "home"
    clone = home / "outbox-sidecar"
    clone.mkdir(parents=True)
    home.chmod(0o700)
    shutil.copytree(ROOT / "infra", clone / "infra")
    before = {p: _mode_and_owner(p) for p in (home, clone, clone / "infra")}
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("OUTBOX_")}
    env["OUTBOX_PG_PORT"] = str(port)
    stack = [str(clone / "infra" / "stack.sh")]
    try:
        up = subprocess.run([*stack, "up", "postgres"], env=env, capture_output=True,
                            text=True, timeout=120)
        assert up.returncode == 0, up.stderr
        with psycopg.connect(host="127.0.0.1", port=port, user="outbox", password="outbox",
                             dbname="outbox") as conn:
            assert conn.execute("show wal_level").fetchone()[0] == "logical"
            assert conn.execute("show listen_addresses").fetchone()[0] == "127.0.0.1"
        assert (clone / ".outbox" / "run" / "postgres.pid").exists()
    finally:
        clean = subprocess.run([*stack, "clean"], env=env, capture_output=True, text=True,
                               timeout=120)
    assert clean.returncode == 0, clean.stderr
    assert {p: _mode_and_owner(p) for p in before} == before
    assert not (clone / ".outbox").exists()
    # Nothing listens on the port any more: the cluster was stopped by its PID.
    try:
        psycopg.connect(host="127.0.0.1", port=port, user="outbox", password="outbox",
                        dbname="outbox", connect_timeout=2).close()
        still_up = True
    except psycopg.OperationalError:
        still_up = False
    assert not still_up
