"""A process started without a setting it needs, or with a misspelt one, stops at once
(exit 2) naming the variable: it never connects to a default address. No server is needed:
each exits before connecting anywhere."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Everything else a deployment would set: only the database URL is missing.
OTHERS = {"OUTBOX_KAFKA_BOOTSTRAP": "kafka.example.com:9093",
          "OUTBOX_ES_URL": "http://search.example.com:9200",
          "OUTBOX_REDIS_URL": "redis://cache.example.com:6379/0"}


def run_outbox(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.upper().startswith("OUTBOX_")}
    return subprocess.run([sys.executable, "-m", "outbox.cli", *args], env={**base, **env},
                          capture_output=True, text=True, timeout=60, cwd=ROOT)


@pytest.mark.parametrize("command", [("relay",), ("project", "search"), ("api",)])
def test_a_process_without_a_database_url_exits_naming_it(command: tuple[str, ...]) -> None:
    done = run_outbox(*command, **OTHERS)
    assert done.returncode == 2, done.stderr
    assert f"outbox {' '.join(command)}: missing setting OUTBOX_DATABASE_URL (" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_misspelt_variable_stops_a_process() -> None:
    done = run_outbox("relay", OUTBOX_DATABASE_URL="postgresql+psycopg://u:p@db.invalid/db",
                      OUTBOX_RELAY_BATCH_SIZ="10", **OTHERS)
    assert done.returncode == 2
    assert ("outbox relay: OUTBOX_RELAY_BATCH_SIZ: unknown setting; did you mean "
            "OUTBOX_RELAY_BATCH_SIZE?") in done.stderr


def test_config_option_names_the_file(tmp_path: Path) -> None:
    config = tmp_path / "outbox.toml"
    config.write_text('database_url = "postgresql+psycopg://u:p@db.invalid/db"\n'
                      'kafka_bootstrp = "kafka:9092"\n')
    done = run_outbox("--config", str(config), "relay", **OTHERS)
    assert done.returncode == 2
    assert ("outbox relay: OUTBOX_CONFIG_FILE: unknown key 'kafka_bootstrp'; did you mean "
            "kafka_bootstrap?") in done.stderr
