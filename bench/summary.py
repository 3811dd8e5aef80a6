"""The figures of one `make bench` run in one place: bench/results/latest.{json,md}.

Reads what the relay, repair, worker and pipeline benchmarks of the run wrote, puts their
headline keys side by side with the targets, and appends each benchmark's own summary.

    python -m bench.summary            # after `make bench`
    python -m bench.summary --quick    # after `make bench-quick`: quick.latest.{json,md}
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from bench.cli import bench_main

RESULTS = Path(__file__).resolve().parent / "results"
PARTS = ("relay", "repair", "workers", "pipeline")


def _target(value: float | None, at_least: float | None = None,
            at_most: float | None = None) -> str:
    if value is None:
        return "not measured"
    met = (at_least is None or value >= at_least) and (at_most is None or value <= at_most)
    return "met" if met else "missed"


def headline(parts: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The keys the benchmarks are quoted by."""
    pipeline, workers = parts["pipeline"], parts["workers"]
    return {
        "outbox_overhead": pipeline["outbox_overhead"],
        "outbox_overhead_message": pipeline["outbox_overhead"].get("message"),
        "pipeline": {k: pipeline["pipeline"][k] for k in ("burst", "steady", "concurrency")},
        "ocr": workers["ocr"],
        "embedding": workers["embedding"],
        "hop_latency": pipeline["hop_latency"],
        "hop_latency_fast_fetch": pipeline["hop_latency_fast_fetch"],
        "continuous_audit": parts["repair"].get("continuous_audit"),
        "relay": _relay(parts["relay"]),
    }


def _relay(relay: dict[str, Any]) -> dict[str, Any]:
    """The logical relay's figures, at-least-once and exactly-once."""
    latency = relay["latency"]
    return {"logical_events_per_s": relay["relay_logical"]["events_per_s"],
            "logical_ratio": relay["relay_logical"]["ratio"],
            "commit_to_ack_ms": {k: latency["ack"][k] for k in ("p50_ms", "p99_ms")},
            "logical_exactly_once_events_per_s":
                relay["relay_logical_exactly_once"]["events_per_s"],
            "exactly_once_ratio": relay["exactly_once_vs_at_least_once"]["ratio"],
            "commit_to_ack_ms_exactly_once": {k: latency["ack_exactly_once"][k]
                                              for k in ("p50_ms", "p99_ms")},
            "commit_to_ack_rate_per_s": latency["ack"]["rate_per_s"]}


def _worst(hops: dict[str, Any], key: str) -> float | None:
    """The slowest hop's figure; None (not measured) when a hop saw no event."""
    values = [h[key] for h in hops.values()]
    return None if None in values else max(values)


def _rows(h: dict[str, Any]) -> list[str]:
    steady, hops = h["pipeline"]["steady"], h["hop_latency"]
    worst50, worst99 = _worst(hops, "p50_ms"), _worst(hops, "p99_ms")
    ocr_plus_1 = round(steady["stages"]["ocr_s"] + 1, 3)
    fast_hops = h["hop_latency_fast_fetch"]["hops"]
    fast50, fast99 = _worst(fast_hops, "p50_ms"), _worst(fast_hops, "p99_ms")
    rows = [
        ("`outbox_overhead` ratio (table mode)", h["outbox_overhead"]["ratio"], ">= 0.85",
         _target(h["outbox_overhead"]["ratio"], at_least=0.85)),
        ("`outbox_overhead` ratio (message mode)", h["outbox_overhead_message"]["ratio"],
         ">= 0.85", _target(h["outbox_overhead_message"]["ratio"], at_least=0.85)),
        ("`ocr` ratio", h["ocr"]["ratio"], ">= 0.9", _target(h["ocr"]["ratio"], at_least=0.9)),
        ("`embedding` ratio", h["embedding"]["ratio"], ">= 0.9",
         _target(h["embedding"]["ratio"], at_least=0.9)),
        ("`pipeline` burst images/s", h["pipeline"]["burst"]["images_per_s"], "", ""),
        ("24-image burst, default OCR concurrency against one at a time",
         h["pipeline"]["concurrency"]["speedup"], ">= 1.8x",
         _target(h["pipeline"]["concurrency"]["speedup"], at_least=1.8)),
        ("`pipeline` steady p50 s", steady["p50_s"], f"<= OCR + 1 s = {ocr_plus_1}",
         _target(steady["p50_s"], at_most=ocr_plus_1)),
        ("`hop_latency` worst p50 ms", worst50, "<= 100", _target(worst50, at_most=100)),
        ("`hop_latency` worst p99 ms", worst99, "<= 500", _target(worst99, at_most=500)),
        ("the same, fetch wait 50 ms: worst p50 ms", fast50, "<= 100",
         _target(fast50, at_most=100)),
        ("the same, fetch wait 50 ms: worst p99 ms", fast99, "<= 500",
         _target(fast99, at_most=500)),
    ]
    relay = h["relay"]
    eo_p99 = relay["commit_to_ack_ms_exactly_once"]["p99_ms"]
    rows += [
        ("relay exactly-once / at-least-once throughput", relay["exactly_once_ratio"],
         ">= 0.8", _target(relay["exactly_once_ratio"], at_least=0.8)),
        (f"relay exactly-once commit-to-ack p99 ms at "
         f"{relay['commit_to_ack_rate_per_s']:,} events/s", eo_p99, "<= 100",
         _target(eo_p99, at_most=100)),
    ]
    audit = h["continuous_audit"]
    if audit is not None:
        rows.append((f"`continuous_audit` s per pass ({audit['slice_rows']:,}-row slice, "
                     f"{audit['changed_per_pass']:,} changed)", audit["pass_seconds"], "", ""))
    return ["| figure | value | target | |", "|---|---|---|---|",
            *(f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows)]


def run(prefix: str) -> None:
    """Merge the run's results into <prefix>latest.{json,md}."""
    parts = {p: json.loads((RESULTS / f"{prefix}{p}.json").read_text()) for p in PARTS}
    h = headline(parts)
    (RESULTS / f"{prefix}latest.json").write_text(
        json.dumps({**h, "runs": parts}, indent=2) + "\n")
    lines = ["# Benchmarks: the figures of one run", "",
             "Each ratio is measured pair by pair in the same run (median, spread in the "
             "part below). The machine is shared; compare ratios, not absolute figures "
             "across runs.", "", *_rows(h), ""]
    for p in PARTS:
        part = (RESULTS / f"{prefix}{p}.md").read_text()
        lines += [re.sub(r"^(#+ )", r"#\1", part, flags=re.MULTILINE), ""]
    (RESULTS / f"{prefix}latest.md").write_text("\n".join(lines))
    print("\n".join(_rows(h)))


def main() -> None:
    """Command-line entry point."""
    bench_main(__doc__, full=lambda: run(""), quick=lambda: run("quick."))


if __name__ == "__main__":
    main()
