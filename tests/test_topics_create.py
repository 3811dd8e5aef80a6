"""`outbox topics --create`: the deploy files' topic job, against the stack's broker."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator

import pytest
from confluent_kafka.admin import AdminClient

from outbox_app.settings import AppSettings


@pytest.fixture
def prefix(base_settings: AppSettings, uid: str) -> Iterator[str]:
    """A topic prefix of this test only; its topics are deleted afterwards."""
    name = f"t{uid}"
    yield name
    admin = AdminClient({"bootstrap.servers": base_settings.kafka_bootstrap})
    mine = [t for t in admin.list_topics(timeout=10).topics if t.startswith(name + ".")]
    for future in (admin.delete_topics(mine) if mine else {}).values():
        future.result(timeout=30)


def _topics(prefix: str, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "outbox.cli", "topics", "--json", *args],
        env={**os.environ, "OUTBOX_TOPIC_PREFIX": prefix, **env},
        capture_output=True, text=True, timeout=60,
    )


def test_create_makes_the_topic_as_configured_and_leaves_an_existing_one(prefix):
    first = _topics(prefix, "--create", "image", "--create", "order",
                    OUTBOX_TOPIC_PARTITIONS="2")
    assert first.returncode == 0, first.stderr
    created = {t["name"]: t for t in json.loads(first.stdout)}  # stdout holds only the report
    assert set(created) == {f"{prefix}.image", f"{prefix}.order"}
    for topic in created.values():
        assert (topic["partitions"], topic["retention_ms"], topic["cleanup_policy"]) == \
            (2, "-1", "delete")
        assert topic["replay_coverage"] == "complete"
    assert '"event": "topic_created"' in first.stderr

    again = _topics(prefix, "--create", "image", OUTBOX_TOPIC_PARTITIONS="5")
    assert again.returncode == 0, again.stderr
    assert [t["partitions"] for t in json.loads(again.stdout)] == [2, 2]
    assert "topic_created" not in again.stderr


def test_a_name_kafka_would_refuse_is_an_error_and_creates_nothing(prefix, base_settings):
    done = _topics(prefix, "--create", "bad name!")
    assert done.returncode == 2
    assert "'bad name!' is not an aggregate type" in done.stderr
    admin = AdminClient({"bootstrap.servers": base_settings.kafka_bootstrap})
    assert not [t for t in admin.list_topics(timeout=10).topics if t.startswith(prefix + ".")]


def test_an_unreachable_broker_is_exit_2_with_the_reason(prefix):
    done = _topics(prefix, "--create", "image", OUTBOX_KAFKA_BOOTSTRAP="127.0.0.1:1")
    assert done.returncode == 2
    assert "outbox topics: cannot create topics on 127.0.0.1:1" in done.stderr
    assert done.stdout == ""
