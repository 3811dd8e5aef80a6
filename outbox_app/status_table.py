"""`outbox status` as one terminal table: a section per part of the snapshot, the rows that
need attention in red, and the attention lines under it."""

from __future__ import annotations

from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table

from outbox_app.continuous_audit import persisting

Row = tuple[str, str, str, str, bool]  # area, name, status, detail, needs attention


def _age(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds:.1f} s"


def _services(report: dict[str, Any]) -> list[Row]:
    return [("service", s["name"], "up" if s["ok"] else "DOWN", s["error"] or "", not s["ok"])
            for s in report["services"]]


def _relay(report: dict[str, Any], max_lag_s: float) -> list[Row]:
    r = report["relay"]
    if r is None:
        return [("relay", "-", "unknown", report["unavailable"].get("relay", "no database"),
                 True)]
    lag = "-" if r["lag_bytes"] is None else f"{r['lag_bytes']} B behind"
    detail = (f"acked {r['acked_lsn'] or '-'} (commit {r['acked_commit_at'] or '-'}); "
              f"{r['waiting_events']} waiting, oldest {_age(r['oldest_waiting_s'])}; "
              f"{'a leader' if r['leader'] else 'no leader'}")
    late = (r["oldest_waiting_s"] or 0) > max_lag_s
    return [("relay", r["slot"] or "(no slot)", lag, detail, bool(r["problems"]) or late)]


def _projectors(report: dict[str, Any], max_lag_s: float) -> list[Row]:
    if report["projectors"] is None:
        return [("projector", "-", "unknown",
                 report["unavailable"].get("log positions", "Kafka unreachable"), True)]
    rows = []
    for p in report["projectors"]:
        behind = f"{'>=' if p['behind_at_least'] else ''}{p['behind']} behind"
        rate = "-" if p["events_per_s"] is None else f"{p['events_per_s']:g}"
        rows.append(("projector", p["name"], behind,
                     f"oldest waiting {_age(p['oldest_waiting_s'])}, {rate} events/s, "
                     f"committed {p['committed']} ({p['group']})",
                     (p["oldest_waiting_s"] or 0) > max_lag_s))
    return rows


def _images(report: dict[str, Any]) -> list[Row]:
    if report["images"] is None:
        return [("images", "-", "unknown", report["unavailable"].get("images", "no database"),
                 True)]
    shown = [i for i in report["images"] if i["count"]]
    if not shown:
        return [("images", "-", "0", "no images", False)]
    return [("images", i["state"], str(i["count"]),
             f"{i['entered_last_minute']} entered in the last minute", False) for i in shown]


def _overdue_and_failed(report: dict[str, Any]) -> list[Row]:
    rows: list[Row] = []
    for o in (report["overdue"] or {}).get("items", []):
        rows.append(("overdue", o["id"], o["state"],
                     f"deadline {o['deadline_at']}, {o['overdue_s']:.0f} s ago, org "
                     f"{o['org_id']}", True))
    for f in (report["failures"] or {}).get("items", []):
        rows.append(("failed", f["id"], f["state"],
                     f"{f['error'] or '(no error recorded)'} (attempts {f['attempts']}, "
                     f"org {f['org_id']})", True))
    return rows


def _continuous_audit(report: dict[str, Any]) -> list[Row]:
    if "continuous audit" in report["unavailable"]:
        return [("audit", "continuous", "unknown", report["unavailable"]["continuous audit"],
                 True)]
    a = report.get("continuous_audit")
    if a is None:
        return [("audit", "continuous", "no pass yet",
                 "the reconciler runs one every OUTBOX_RECONCILER_AUDIT_INTERVAL_S", False)]
    open_drift = ", ".join(f"{k} {n}" for k, n in sorted(a["open"].items())) or "none"
    sweep = "-" if a["last_sweep_s"] is None else f"{a['last_sweep_s']:.0f} s"
    return [("audit", "continuous", f"{a['passes']} passes",
             f"last {a['last_pass_at'][:19]}Z, {a['last_pass_s']} s, {a['rows']} images; "
             f"drift found: {open_drift}; last sweep of the table {sweep}",
             bool(list(persisting(a))))]


def _dead_letters(report: dict[str, Any]) -> list[Row]:
    if report["dead_letters"] is None:
        return []
    if not report["dead_letters"]:
        return [("dead letters", "-", "0", "no dead-letter topic", False)]
    return [("dead letters", d["topic"], str(d["letters"]),
             f"{d['not_replayed']} not replayed"
             + ("" if d["counted_all"] else " (counted in part: the read stopped early)"),
             d["not_replayed"] > 0) for d in report["dead_letters"]]


def status_table(report: dict[str, Any]) -> Table:
    """The snapshot as one table: area, name, status, detail."""
    max_lag_s = report["max_lag_s"]
    scope = f"org {report['org']}" if report["org"] else "all orgs"
    table = Table(title=f"outbox status: {scope}, schema {report['schema']!r}, "
                        f"{report['generated_at'][:19]}Z", box=box.SIMPLE_HEAD)
    for col in ("area", "name", "status", "detail"):
        table.add_column(col, overflow="fold")
    sections = [_services(report), _relay(report, max_lag_s), _projectors(report, max_lag_s),
                _images(report), _overdue_and_failed(report), _continuous_audit(report),
                _dead_letters(report)]
    for rows in filter(None, sections):
        for area, name, status, detail, bad in rows:
            table.add_row(area, name, status, detail, style="red" if bad else None)
        table.add_section()
    return table


def print_status(report: dict[str, Any], console: Console | None = None) -> None:
    """Print the table, then each line that needs attention (or that nothing does)."""
    console = console or Console()
    console.print(status_table(report))
    if report["attention"]:
        for line in report["attention"]:
            console.print(f"attention: {line}", style="red", markup=False, highlight=False)
    else:
        console.print("healthy: nothing needs attention", style="green")
