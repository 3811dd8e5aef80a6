"""What a fault scenario measured, the invariants every scenario keeps, and the report that
`make faults` writes."""

from __future__ import annotations

import json
import os
import platform
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

# `make faults` sets this; `make test` runs the short versions.
FULL = os.environ.get("OUTBOX_FAULTS_SCALE") == "full"
RESULTS = Path(__file__).resolve().parents[2] / "bench" / "results"
# The relay's delivery modes (`OUTBOX_RELAY_EXACTLY_ONCE`).
AT_LEAST_ONCE, EXACTLY_ONCE = "at-least-once", "exactly-once"


def scale(full: float, short: float) -> float:
    """The full-size figure under `make faults`, the short one otherwise."""
    return full if FULL else short


@dataclass
class Outcome:
    """One scenario's counts. `docs_*` and `failed_images` are None where no view is
    involved (relay scenarios). Exactly-once: `in_kafka` and `duplicates` count only the
    records of committed Kafka transactions; `leaked_*` the records of aborted ones that
    the broker let through to read_committed readers (None at-least-once)."""

    scenario: str
    fault: str
    committed: int  # events committed in the database (the outbox rows)
    in_kafka: int  # of those, distinct events found in Kafka
    duplicates: int  # deliveries beyond the first
    dead_letters: int
    recover_s: float  # from the end of the fault until everything arrived / views agree
    docs_right: int | None = None  # documents at their database version
    docs_total: int | None = None
    failed_images: int | None = None  # images in a failed state at the end
    audit_findings: int | None = None
    expected_dead_letters: int = 0
    delivery: str = AT_LEAST_ONCE
    leaked_records: int | None = None  # aborted transactions' records read as committed
    leaked_events: int | None = None  # distinct events among them
    notes: list[str] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)  # scenario-specific failures

    def problems(self) -> list[str]:
        """Every broken invariant (empty when the scenario held)."""
        out = list(self.violations)
        if self.in_kafka != self.committed:
            out.append(f"lost {self.committed - self.in_kafka} of {self.committed} events")
        if self.delivery == EXACTLY_ONCE and self.duplicates:
            out.append(f"{self.duplicates} duplicates among committed transactions")
        if self.docs_total is not None and self.docs_right != self.docs_total:
            out.append(f"{self.docs_total - (self.docs_right or 0)} documents not at the "
                       f"database version")
        if self.failed_images:
            out.append(f"{self.failed_images} images in a failed state")
        if self.audit_findings:
            out.append(f"the audit found {self.audit_findings} disagreements")
        if self.dead_letters != self.expected_dead_letters:
            out.append(f"{self.dead_letters} dead letters, expected "
                       f"{self.expected_dead_letters}")
        return out


def write_report(outcomes: list[Outcome]) -> None:
    """bench/results/faults.json and faults.md from the outcomes of a full run."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    meta = {"at": datetime.now(UTC).isoformat(timespec="seconds"),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores",
            "python": platform.python_version()}
    (RESULTS / "faults.json").write_text(json.dumps(
        {"meta": meta, "scenarios": [asdict(o) for o in outcomes]}, indent=2) + "\n")
    lines = [
        "# Fault suite", "",
        f"`make faults`, {meta['at']}, {meta['machine']}. Each row: one scenario against the "
        "local stack; `committed` are the events in the database, `in Kafka` the distinct "
        "ones of those read back with kafka-python, `docs` the documents at their database "
        "version, `recover` the seconds from the end of the fault until everything arrived "
        "and the views agreed. `delivery` is the relay's mode: exactly-once rows count only "
        "the records of committed Kafka transactions (read_committed, each record's "
        "transaction told by its `outbox_kafka_txn` header and the relay's chain of "
        "position records), where nothing may be duplicated or lost; `leaked aborted` are "
        "the records of aborted transactions that the local broker let through to "
        "read_committed readers anyway (its caveat, in the relays' documentation), and "
        "the distinct events among them.", "",
        "| # | scenario | delivery | fault | committed | in Kafka | duplicates "
        "| leaked aborted | dead letters | docs | failed images | recover (s) | held |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for i, o in enumerate(outcomes, 1):
        leaked = ("—" if o.leaked_records is None
                  else f"{o.leaked_records} ({o.leaked_events} events)")
        docs = "—" if o.docs_total is None else f"{o.docs_right}/{o.docs_total}"
        failed = "—" if o.failed_images is None else str(o.failed_images)
        held = "yes" if not o.problems() else "NO: " + "; ".join(o.problems())
        lines.append(f"| {i} | {o.scenario} | {o.delivery} | {o.fault} | {o.committed} | "
                     f"{o.in_kafka} | {o.duplicates} | {leaked} | {o.dead_letters} | {docs} | "
                     f"{failed} | {o.recover_s:.1f} | {held} |")
    # The relay scenarios run in both modes: a note names the mode unless at-least-once.
    notes = [(o.scenario if o.delivery == AT_LEAST_ONCE else f"{o.scenario}, {o.delivery}", n)
             for o in outcomes for n in o.notes]
    if notes:
        lines += ["", "## Notes", ""] + [f"- **{s}:** {n}" for s, n in notes]
    (RESULTS / "faults.md").write_text("\n".join(lines) + "\n")
