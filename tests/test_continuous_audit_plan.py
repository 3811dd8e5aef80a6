"""The continuous audit's planning, with no server: which rows a pass reads (the changed
rows after the watermark, a slice after the cursor), how both move, when a sweep of the
table closes, and when drift counts as persisting."""

from __future__ import annotations

import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta

from outbox_app.continuous_audit import (
    LAST_ID,
    PERSISTING_PASSES,
    Cursor,
    advance,
    coverage_period_s,
    is_due,
    persisting,
    plan_pass,
    record_results,
)

NOW = datetime(2025, 1, 1, 12, 0, tzinfo=UTC)
LIMITS = {"grace_s": 60, "interval_s": 300, "slice_rows": 3, "max_changed_rows": 2}


def ids(n: int) -> list[uuid.UUID]:
    return sorted(uuid.UUID(int=i * 1000) for i in range(1, n + 1))


def test_a_first_pass_looks_one_interval_back_and_starts_the_slices_at_the_beginning():
    plan = plan_pass(Cursor(), NOW, **LIMITS)
    assert plan.upto == NOW - timedelta(seconds=60)
    assert plan.changed_after == (NOW - timedelta(seconds=360), LAST_ID)
    assert plan.slice_after is None
    assert (plan.changed_limit, plan.slice_limit) == (2, 3)


def test_a_short_page_of_changes_moves_the_watermark_to_the_window_end():
    plan = plan_pass(Cursor(), NOW, **LIMITS)
    one = [(NOW - timedelta(seconds=100), uuid.uuid4())]
    after = advance(Cursor(), plan, NOW, changed=one, slice_ids=ids(3))
    assert (after.watermark_at, after.watermark_id) == (plan.upto, LAST_ID)
    # The next pass starts right after it: nothing judged twice, nothing skipped.
    later = plan_pass(after, NOW + timedelta(seconds=300), **LIMITS)
    assert later.changed_after == (plan.upto, LAST_ID)
    assert later.upto == plan.upto + timedelta(seconds=300)


def test_a_full_page_of_changes_keeps_the_rest_for_the_next_pass():
    plan = plan_pass(Cursor(), NOW, **LIMITS)
    at = NOW - timedelta(seconds=200)
    full = [(at, uuid.UUID(int=1)), (at, uuid.UUID(int=2))]  # the limit: 2
    after = advance(Cursor(), plan, NOW, changed=full, slice_ids=ids(3))
    assert (after.watermark_at, after.watermark_id) == full[-1]
    assert plan_pass(after, NOW, **LIMITS).changed_after == full[-1]


def test_the_slices_walk_the_ids_and_wrap_around_closing_a_sweep():
    table = ids(7)
    cursor, sweeps, seen = Cursor(), [], []
    for n in range(5):
        now = NOW + timedelta(seconds=300 * n)
        plan = plan_pass(cursor, now, **LIMITS)
        page = [i for i in table if plan.slice_after is None or i > plan.slice_after][:3]
        seen.append(page)
        cursor = advance(cursor, plan, now, changed=[], slice_ids=page)
        sweeps.append(cursor.last_cycle_s)
    assert seen == [table[0:3], table[3:6], table[6:7], table[0:3], table[3:6]]
    # A sweep of three slices: from its first pass to its third, two intervals.
    assert sweeps == [None, None, 600.0, 600.0, 600.0]
    assert cursor.cycle_started_at == NOW + timedelta(seconds=900)
    plan = plan_pass(cursor, NOW + timedelta(seconds=1500), **LIMITS)
    cursor = advance(cursor, plan, NOW + timedelta(seconds=1500), changed=[],
                     slice_ids=table[6:7])
    assert cursor.slice_after is None and cursor.cycle_started_at is None
    assert cursor.last_cycle_s == 600.0


def test_an_empty_table_wraps_every_pass():
    plan = plan_pass(Cursor(), NOW, **LIMITS)
    after = advance(Cursor(), plan, NOW, changed=[], slice_ids=[])
    assert after.slice_after is None and after.last_cycle_s == 0.0


def test_a_pass_is_due_an_interval_after_the_last_one_by_anyone():
    assert is_due(Cursor(), NOW, 300)
    last = Cursor(last_pass_at=NOW - timedelta(seconds=299))
    assert not is_due(last, NOW, 300)
    assert is_due(last, NOW + timedelta(seconds=1), 300)


def test_drift_found_pass_after_pass_persists_and_clears_when_a_pass_finds_none():
    cursor = Cursor()
    for n in range(PERSISTING_PASSES):
        cursor = record_results(cursor, Counter({"view_missing": 2, "cache_missing": (n + 1) % 2}),
                                NOW, 0.5, 10)
    assert cursor.drift_passes == {"view_missing": PERSISTING_PASSES, "cache_missing": 1}
    assert cursor.open_drift == {"view_missing": 2, "cache_missing": 1}
    summary = {"open": cursor.open_drift, "drift_passes": cursor.drift_passes}
    assert list(persisting(summary)) == [
        f"continuous audit: view_missing found in {PERSISTING_PASSES} passes in a row "
        "(2 open at the last); `outbox audit` lists them"]
    cursor = record_results(cursor, Counter(), NOW, 0.5, 10)
    assert cursor.drift_passes == {} and cursor.open_drift == {}
    assert cursor.passes == PERSISTING_PASSES + 1
    assert list(persisting(None)) == []


def test_the_coverage_period_is_one_interval_per_slice():
    assert coverage_period_s(100_000, 5_000, 300) == 20 * 300
    assert coverage_period_s(1_000_000, 5_000, 300) == 200 * 300
    assert coverage_period_s(1, 5_000, 300) == 300
    assert coverage_period_s(0, 5_000, 300) == 300


def _report(audit: dict | None) -> dict:
    return {"generated_at": NOW.isoformat(), "org": None, "schema": "s", "max_lag_s": 60.0,
            "services": [], "relay": None, "projectors": None, "dead_letters": None,
            "images": [], "overdue": None, "failures": None, "unavailable": {},
            "continuous_audit": audit}


def test_status_shows_the_last_pass_and_needs_attention_only_when_drift_persists():
    from rich.console import Console

    from outbox_app.status import attention
    from outbox_app.status_table import print_status

    audit = {"last_pass_at": NOW.isoformat(), "last_pass_s": 0.8, "rows": 5100, "passes": 12,
             "open": {"view_missing": 2}, "drift_passes": {"view_missing": 1},
             "last_sweep_s": 5700.0, "watermark_at": NOW.isoformat()}
    once = _report(audit)
    once["attention"] = attention(once, 60.0)
    console = Console(record=True, width=300)
    print_status(once, console)
    text = console.export_text()
    assert "12 passes" in text and "drift found: view_missing 2" in text
    assert "continuous audit" not in "".join(once["attention"])
    persists = _report({**audit, "drift_passes": {"view_missing": PERSISTING_PASSES}})
    assert attention(persists, 60.0) == list(persisting(persists["continuous_audit"]))
    none_yet = _report(None)
    none_yet["attention"] = attention(none_yet, 60.0)
    console = Console(record=True, width=300)
    print_status(none_yet, console)
    assert "no pass yet" in console.export_text()
