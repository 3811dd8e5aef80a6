"""Commands that print a report give it as JSON with --json, with the same facts as their
text; `outbox --version`; `outbox relay drop` asks before dropping anything."""

from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import sys
from importlib.metadata import version

from outbox.pg_names import slot_name
from tests.relay_harness import settings_env


def _outbox(settings, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "outbox.cli", *args],
                          env={**os.environ, **settings_env(settings)},
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)


def test_version_comes_from_the_installed_distribution(base_settings):
    shown = _outbox(base_settings, "--version")
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.strip() == f"outbox (outbox-sidecar) {version('outbox-sidecar')}"


def test_migrate_reports_as_json_what_its_line_says(settings):
    as_json = _outbox(settings, "migrate", "--json")
    assert as_json.returncode == 0, as_json.stderr
    assert json.loads(as_json.stdout) == {"schema": settings.db_schema, "revision": "head",
                                          "history": "all"}
    as_text = _outbox(settings, "migrate")
    assert as_text.returncode == 0, as_text.stderr
    assert as_text.stdout.strip() == f"database schema {settings.db_schema!r} at head"


def test_retry_reports_as_json_what_its_text_says(migrated):
    as_json = _outbox(migrated, "retry", "--state", "ocr_failed", "--json")
    assert as_json.returncode == 0, as_json.stderr
    assert json.loads(as_json.stdout) == {"retried": [], "skipped": {}}
    as_text = _outbox(migrated, "retry", "--state", "ocr_failed")
    assert as_text.returncode == 0, as_text.stderr
    assert as_text.stdout.splitlines() == ["retried: none", "skipped: none"]


def test_relay_drop_at_a_terminal_asks_and_drops_nothing_unless_told(base_settings, uid):
    # A schema that exists nowhere: whatever the answer, no database is touched before it.
    schema = f"t_{uid}"
    controller, terminal = pty.openpty()
    try:
        proc = subprocess.Popen([sys.executable, "-m", "outbox.cli", "relay", "drop"],
                                env={**os.environ, "OUTBOX_DB_SCHEMA": schema},
                                stdin=terminal, stdout=terminal, stderr=subprocess.PIPE,
                                text=True)
        asked = ""
        while "[y/N]" not in asked:  # answered once asked, as a person would
            assert select.select([controller], [], [], 60)[0], f"no question asked: {asked!r}"
            asked += os.read(controller, 4096).decode()
        os.write(controller, b"n\n")
        _, err = proc.communicate(timeout=60)
    finally:
        os.close(controller)
        os.close(terminal)
    assert proc.returncode == 1, err
    assert f"Drop the replication slot {slot_name(schema)!r}" in asked
    assert "not confirmed; nothing dropped" in err
