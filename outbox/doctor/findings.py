"""What a doctor check reports, and the exit code of a set of findings."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

Status = Literal["pass", "warn", "fail", "skip"]
Role = Literal["app", "relay", "owner"]

# Exit codes of `outbox doctor`: every check passed (skips included), warnings only, a failure.
EXIT_PASS, EXIT_WARN, EXIT_FAIL = 0, 1, 2


@dataclass(frozen=True)
class Finding:
    """The outcome of one check: `check` names it (`<service>.<what>`), `message` says what
    was found, `fix` the command or setting that repairs it (None when nothing is to do)."""

    check: str
    status: Status
    message: str
    fix: str | None = None


@dataclass(frozen=True)
class DoctorOptions:
    """What the checks are asked: the database role's purpose, the relay mode, the aggregate
    types whose topics must exist, and how long to wait for each service."""

    role: Role = "owner"
    relay_mode: Literal["logical", "poll"] = "logical"
    aggregate_types: tuple[str, ...] = field(default_factory=tuple)
    timeout_s: float = 5.0


# A group of checks: one service's, or a registered package's.
Checks = Callable[[DoctorOptions], Iterable[Finding]]


def passed(check: str, message: str) -> Finding:
    """A check that holds."""
    return Finding(check, "pass", message)


def warned(check: str, message: str, fix: str) -> Finding:
    """Works now, but at a risk the message names."""
    return Finding(check, "warn", message, fix)


def failed(check: str, message: str, fix: str) -> Finding:
    """Does not work."""
    return Finding(check, "fail", message, fix)


def skipped(check: str, message: str) -> Finding:
    """Not checked, and why (not needed in this configuration, or a check before it failed)."""
    return Finding(check, "skip", message)


def exit_code(findings: Iterable[Finding]) -> int:
    """2 when a check failed, 1 when one warned, else 0."""
    statuses = {f.status for f in findings}
    if "fail" in statuses:
        return EXIT_FAIL
    return EXIT_WARN if "warn" in statuses else EXIT_PASS


def report(findings: list[Finding]) -> dict[str, Any]:
    """The JSON shape of `outbox doctor --json`."""
    counts = Counter(f.status for f in findings)
    return {"exit_code": exit_code(findings),
            "summary": {s: counts.get(s, 0) for s in ("pass", "warn", "fail", "skip")},
            "checks": [asdict(f) for f in findings]}
