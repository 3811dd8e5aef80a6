"""`outbox doctor` without servers: exit codes, the report's shape, the checks' verdicts on
facts, and a group that cannot run."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from outbox.doctor.command import run_checks
from outbox.doctor.findings import (
    DoctorOptions,
    exit_code,
    failed,
    passed,
    report,
    skipped,
    warned,
)
from outbox.doctor.postgres import (
    ServerFacts,
    capacity_finding,
    version_finding,
    wal_retention_finding,
)
from outbox_app.doctor_checks import search_version_finding
from outbox_images.settings import ImageSettings

FACTS = ServerFacts(version_num=150020, version="15.20", wal_level="logical",
                    max_replication_slots=4, used_slots=1, max_wal_senders=4,
                    used_wal_senders=1, max_slot_wal_keep_size="-1", role="outbox",
                    superuser=False, replication=True)


@pytest.mark.parametrize("statuses, code", [
    ((), 0), (("pass", "skip"), 0), (("pass", "warn"), 1), (("warn", "fail", "pass"), 2)])
def test_exit_code_is_the_worst_status(statuses, code):
    makers = {"pass": lambda: passed("x", "m"), "skip": lambda: skipped("x", "m"),
              "warn": lambda: warned("x", "m", "f"), "fail": lambda: failed("x", "m", "f")}
    assert exit_code([makers[s]() for s in statuses]) == code


def test_the_json_report_counts_and_lists_every_check():
    got = report([passed("a.b", "fine"), warned("c.d", "risky", "do this")])
    assert got == {"exit_code": 1, "summary": {"pass": 1, "warn": 1, "fail": 0, "skip": 0},
                   "checks": [{"check": "a.b", "status": "pass", "message": "fine",
                               "fix": None},
                              {"check": "c.d", "status": "warn", "message": "risky",
                               "fix": "do this"}]}


def test_simulated_facts_of_a_server_older_than_14_fail_the_version_check():
    # No PostgreSQL 13 on this machine: the facts stand in for one.
    old = version_finding(FACTS.__class__(**{**FACTS.__dict__, "version_num": 130015,
                                             "version": "13.15"}))
    assert old.status == "fail" and "14 or later" in old.message and old.fix
    assert version_finding(FACTS).status == "pass"


def test_unbounded_wal_retention_warns_and_a_bound_says_the_slot_can_be_invalidated():
    unbounded = wal_retention_finding(FACTS)
    assert unbounded.status == "warn" and "disk" in unbounded.message
    assert "max_slot_wal_keep_size" in unbounded.fix
    bounded = wal_retention_finding(FACTS.__class__(**{**FACTS.__dict__,
                                                       "max_slot_wal_keep_size": "10GB"}))
    assert bounded.status == "pass" and "invalidated" in bounded.message


def test_capacity_counts_the_relays_own_slot_and_sender_as_available():
    full = FACTS.__class__(**{**FACTS.__dict__, "used_slots": 4, "used_wal_senders": 4})
    assert capacity_finding(full, ("reserved", True)).status == "pass"
    refused = capacity_finding(full, None)
    assert refused.status == "fail"
    assert "no free replication slot and no free WAL sender" in refused.message


@pytest.mark.parametrize("server, client, status", [
    ("8.19.3", "8.19.3", "pass"), ("8.20.0", "8.19.3", "pass"),
    ("8.15.3", "8.19.3", "warn"), ("7.17.9", "8.19.3", "fail"), ("9.0.1", "8.19.3", "fail")])
def test_search_versions_simulated_servers(server, client, status):
    # Version strings stand in for servers of other versions.
    found = search_version_finding(server, client)
    assert found.status == status
    if status == "fail":
        assert f"elasticsearch>={server.split('.')[0]}," in found.fix


def test_a_group_with_invalid_settings_fails_by_name_and_the_others_still_run():
    def bad_settings(_: DoctorOptions) -> list:
        ImageSettings(max_upload_bytes="lots")
        return []

    found = run_checks(DoctorOptions(), [("images", bad_settings),
                                         ("other", lambda _: [passed("other.ok", "fine")])])
    assert [(f.check, f.status) for f in found] == [("images.settings", "fail"),
                                                    ("other.ok", "pass")]
    assert "OUTBOX_MAX_UPLOAD_BYTES" in found[0].message
    with pytest.raises(ValidationError):
        bad_settings(DoctorOptions())
