"""The image state machine: guarded transitions with deadlines and events."""

from __future__ import annotations

import threading
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import func, select, text

from outbox.tables import outbox_table
from outbox_images.policy import RETRYABLE, TERMINAL, TRANSITIONS, ImageState, deadline_seconds
from outbox_images.store import (
    IllegalTransition,
    StaleVersion,
    create_image,
    load_image,
    transition,
)

S = ImageState


def _new(engine, settings, **kw):
    with engine.begin() as conn:
        return create_image(conn, settings, image_id=uuid.uuid4(), org_id="org-a",
                            filename="a.png", content_type="image/png", declared_size=10,
                            object_key="k", **kw)


def _events(engine, image_id) -> list[tuple[str, int]]:
    with engine.connect() as conn:
        rows = conn.execute(
            select(outbox_table.c.type, outbox_table.c.aggregate_version)
            .where(outbox_table.c.aggregate_id == str(image_id))
            .order_by(outbox_table.c.seq)
        ).all()
    return [tuple(r) for r in rows]


def test_transition_bumps_version_sets_deadline_and_emits_full_document(engine, migrated):
    row = _new(engine, migrated)
    assert (row["state"], row["version"]) == ("requested", 1)
    before = datetime.now(UTC)
    with engine.begin() as conn:
        new = transition(conn, row, S.UPLOADED, migrated, {"object_size": 10})
    assert (new["state"], new["version"], new["object_size"]) == ("uploaded", 2, 10)
    expected = timedelta(seconds=deadline_seconds(S.UPLOADED, migrated))
    assert abs((new["deadline_at"] - before) - expected) < timedelta(seconds=5)
    assert _events(engine, row["id"]) == [("image.requested", 1), ("image.uploaded", 2)]
    with engine.connect() as conn:
        payload = conn.execute(
            select(outbox_table.c.payload).where(outbox_table.c.type == "image.uploaded")
        ).scalar_one()
    assert payload["state"] == "uploaded" and payload["version"] == 2
    assert payload["object_size"] == 10 and payload["id"] == str(row["id"])


def test_terminal_states_have_no_deadline(migrated):
    assert all(deadline_seconds(s, migrated) is None for s in TERMINAL)
    # Out of a final state: only deletion, or an operator's retry of a failed one.
    assert not any(src in TERMINAL and dst is not S.DELETED and RETRYABLE.get(src) != dst
                   for src, dst in TRANSITIONS if src is not S.DELETED)


def test_illegal_transition_writes_nothing(engine, migrated):
    row = _new(engine, migrated)
    with pytest.raises(IllegalTransition), engine.begin() as conn:
        transition(conn, row, S.EMBEDDED, migrated)
    with engine.begin() as conn:
        deleted = transition(conn, row, S.DELETED, migrated)
    with pytest.raises(IllegalTransition), engine.begin() as conn:
        transition(conn, deleted, S.DELETED, migrated, {"metadata": {"title": "x"}})
    with engine.connect() as conn:
        assert load_image(conn, "org-a", row["id"])["version"] == 2
    assert _events(engine, row["id"]) == [("image.requested", 1), ("image.deleted", 2)]


def test_stale_transition_writes_nothing(engine, migrated):
    row = _new(engine, migrated)
    with engine.begin() as conn:
        transition(conn, row, S.REQUESTED, migrated, {"metadata": {"title": "first"}})
    with pytest.raises(StaleVersion), engine.begin() as conn:
        transition(conn, row, S.UPLOADED, migrated, {"object_size": 1})
    with engine.connect() as conn:
        now = load_image(conn, "org-a", row["id"])
    assert (now["state"], now["version"], now["metadata"]) == ("requested", 2, {"title": "first"})
    assert len(_events(engine, row["id"])) == 2


def test_concurrent_conflicting_transitions_exactly_one_wins(engine, migrated):
    row = _new(engine, migrated)
    barrier = threading.Barrier(2)
    outcomes: list[str] = []

    def attempt(to: ImageState) -> None:
        try:
            with engine.begin() as conn:
                barrier.wait()
                transition(conn, row, to, migrated)
                # Hold the row lock so the other transaction must wait, then re-check.
                conn.execute(text("select pg_sleep(0.2)"))
            outcomes.append("won")
        except StaleVersion:
            outcomes.append("stale")

    threads = [threading.Thread(target=attempt, args=(s,)) for s in (S.EXPIRED, S.DELETED)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == ["stale", "won"]
    events = _events(engine, row["id"])
    assert len(events) == 2 and events[1][1] == 2
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(outbox_table)).scalar_one() == 2


def test_due_deadlines_are_read_through_the_index(engine, migrated):
    for _ in range(3):
        _new(engine, migrated)
    with engine.connect() as conn:
        conn.execute(text("set enable_seqscan = off"))
        plan = "\n".join(r[0] for r in conn.execute(
            text("explain select id from image where deadline_at < now()")))
    assert "image_deadline_idx" in plan
