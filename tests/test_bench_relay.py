"""The relay benchmark at CI size (`python -m bench.relay --quick`, as `make bench-quick` runs
it) against the stack: it runs to the end and reports the logical relay in both delivery
modes side by side, each measured as what it claims to be."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from bench.relay import EO_MAX_P99_MS, EO_MIN_RATIO, RESULTS, ROOT

pytestmark = pytest.mark.slow
VARIANTS = ("logical", "logical_exactly_once", "poll")


def test_quick_run_reports_both_delivery_modes() -> None:
    started = time.time()
    subprocess.run([sys.executable, "-m", "bench.relay", "--quick"], cwd=ROOT, env=os.environ,
                   check=True, timeout=900)
    json_path, md_path = RESULTS / "quick.relay.json", RESULTS / "quick.relay.md"
    assert json_path.stat().st_mtime >= started and md_path.stat().st_mtime >= started
    r = json.loads(json_path.read_text())

    for broker in (r, r["durable_broker"]):
        for variant in VARIANTS:
            row = broker[f"relay_{variant}"]
            assert row["events"] == r["events"]
            assert row["events_per_s"] > 0 and row["batches"] > 0
            # Each relay ran in the mode its row names: only exactly-once records carry
            # the Kafka transaction's id.
            assert row["in_kafka_transactions"] is (variant == "logical_exactly_once")
        # Whether the broker completed the transactions is the broker's matter: reported.
        assert isinstance(broker["relay_logical_exactly_once"]["read_committed_sees_all"], bool)
        # One round at CI size: the ratio is that pair's.
        eo = broker["exactly_once_vs_at_least_once"]
        assert eo["target_at_least"] == EO_MIN_RATIO
        assert eo["ratio"] == round(broker["relay_logical_exactly_once"]["events_per_s"]
                                    / broker["relay_logical"]["events_per_s"], 3)

    for key in ("ack", "ack_exactly_once"):
        a = r["latency"][key]
        # Every transaction the writer committed was acknowledged (exactly-once: committed).
        assert a["transactions"] > 0 and a["acked_transactions"] == a["transactions"]
        assert 0 < a["p50_ms"] <= a["p99_ms"] <= a["max_ms"]
    assert r["latency"]["ack_exactly_once"]["target_p99_ms"] == EO_MAX_P99_MS

    md = md_path.read_text()
    assert md.count("| logical, exactly-once |") == 2  # both brokers
    assert "Exactly-once / at-least-once throughput" in md and "- exactly-once" in md
