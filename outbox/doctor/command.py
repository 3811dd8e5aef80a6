"""`outbox doctor`: runs the core's checks and every registered package's, prints them, and
exits 0 (all passed), 1 (warnings only) or 2 (a check failed)."""

from __future__ import annotations

import argparse
from collections.abc import Iterable
from importlib.metadata import EntryPoint, entry_points
from typing import Any

from pydantic import ValidationError

from outbox.doctor.findings import Checks, DoctorOptions, Finding, failed, report, skipped
from outbox.doctor.kafka import kafka_checks
from outbox.doctor.postgres import postgres_checks
from outbox.extras import ExtraMissing

STATUS_STYLE = {"pass": "green", "warn": "yellow", "fail": "red", "skip": "dim"}


def _loaded_when_run(ep: EntryPoint) -> Checks:
    """A group's checks, imported when they run: a package installed without the extra its
    checks need is then one skipped finding, not a failed command."""
    def checks(options: DoctorOptions) -> list[Finding]:
        return ep.load()(options)
    return checks


def registered_checks() -> list[tuple[str, Checks]]:
    """The core's check groups, then those of the entry-point group `outbox.doctor`, by
    name."""
    found = sorted(entry_points(group="outbox.doctor"), key=lambda ep: ep.name)
    return [("postgres", postgres_checks), ("kafka", kafka_checks),
            *((ep.name, _loaded_when_run(ep)) for ep in found)]


def _setting_errors(exc: ValidationError) -> str:
    """A settings error as the variables to set."""
    return "; ".join(f"OUTBOX_{'_'.join(map(str, e['loc'])).upper()}: {e['msg']}"
                     for e in exc.errors())


def run_checks(options: DoctorOptions,
               groups: Iterable[tuple[str, Checks]] | None = None) -> list[Finding]:
    """Every group's findings; a group that cannot run (its settings invalid, an unexpected
    error) is one failed finding instead of a crash, and the other groups still run."""
    findings: list[Finding] = []
    for name, checks in registered_checks() if groups is None else groups:
        try:
            findings += checks(options)
        except ExtraMissing as exc:
            findings.append(skipped(f"{name}.checks", str(exc)))
        except ValidationError as exc:
            findings.append(failed(f"{name}.settings", _setting_errors(exc),
                                   "set the variables named (see `outbox config`)"))
        except Exception as exc:  # one group's error must not hide the others' findings
            findings.append(failed(f"{name}.checks", f"the checks could not run: "
                                   f"{type(exc).__name__}: {exc}",
                                   "fix the error named, then run `outbox doctor` again"))
    return findings


def _cmd_doctor(args: argparse.Namespace) -> int:
    """Check every setting against the live services."""
    from outbox.cli import print_report

    options = DoctorOptions(role=args.role, relay_mode=args.relay_mode,
                            aggregate_types=tuple(args.aggregate_type), timeout_s=args.timeout)
    result = report(run_checks(options))
    print_report(result, args.json, _print)
    return int(result["exit_code"])


def _print(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.markup import escape

    console = Console(highlight=False)
    width = max(len(f["check"]) for f in result["checks"]) if result["checks"] else 0
    for f in result["checks"]:
        console.print(f"[{STATUS_STYLE[f['status']]}]{f['status']:4}[/]  "
                      f"{f['check']:{width}}  {escape(f['message'])}")
        if f["fix"]:
            console.print(f"{'':{width + 8}}[bold]fix:[/] {escape(f['fix'])}")
    console.print(", ".join(f"{n} {s}" for s, n in result["summary"].items())
                  + f"; exit {result['exit_code']}")


def register(sub: argparse._SubParsersAction) -> None:
    """Add `outbox doctor` to the command line."""
    from outbox.cli import _aggregate_type

    p = sub.add_parser(
        "doctor", help="check every setting against the live services; exit 0 all passed, "
        "1 warnings only, 2 a check failed")
    p.add_argument("--role", choices=["app", "relay", "owner"], default="owner",
                   help="what the database role of OUTBOX_DATABASE_URL is used for (default: "
                        "owner, the role `outbox migrate` runs as)")
    p.add_argument("--relay-mode", choices=["logical", "poll"], default="logical",
                   help="the relay's mode: poll needs no wal_level, slot or publication")
    p.add_argument("--aggregate-type", action="append", default=[], type=_aggregate_type,
                   metavar="TYPE", help="this type's event topic must exist (repeatable)")
    p.add_argument("--timeout", type=float, default=5.0,
                   help="seconds to wait for each service (default: 5)")
    p.add_argument("--json", action="store_true", help="JSON instead of a table")
    p.set_defaults(func=_cmd_doctor)
