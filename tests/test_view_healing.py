"""The view healer's bookkeeping, with no server: a loss is counted once, one rebuild at a
time per view, a failed rebuild is tried again the next round, a store that cannot be asked
is no loss, and a stop interrupts the rebuild in progress. The rebuild procedure itself and
the probes run against the real stores in tests/test_view_healing_stores.py and
tests/test_self_healing.py."""

from __future__ import annotations

import threading

from outbox_app.view_healing import ViewHealer
from projectors.rebuild_lock import RebuildBusy, rebuild_lock_name
from projectors.settings import RuntimeSettings
from tests.pipeline_harness import metric, wait_for


class ScriptedRebuild:
    """Stands in for `projectors.rebuild.Rebuild` (which needs the broker and the stores):
    `run` ends as scripted, after `release` is set."""

    def __init__(self, outcome: BaseException | None, release: threading.Event) -> None:
        self.stop = threading.Event()
        self._outcome = outcome
        self._release = release

    def run(self) -> dict[str, object]:
        while not self._release.wait(0.01):
            if self.stop.is_set():
                raise InterruptedError("stopped")
        if self._outcome is not None:
            raise self._outcome
        return {"view": "v", "copy": "c", "events_applied": 0, "seconds": 0.0, "removed": []}


def _counts(view: str) -> dict[str, float]:
    return {"lost": metric("outbox_view_lost_total", view=view),
            **{o: metric("outbox_view_rebuilds_total", view=view, outcome=o)
               for o in ("succeeded", "failed", "interrupted", "locked")}}


def _delta(before: dict[str, float], view: str) -> dict[str, float]:
    return {k: v - before[k] for k, v in _counts(view).items() if v != before[k]}


def test_a_loss_is_counted_once_and_rebuilt_once_at_a_time():
    present = [False]
    release = threading.Event()
    made: list[ScriptedRebuild] = []

    def make() -> ScriptedRebuild:
        made.append(ScriptedRebuild(None, release))
        return made[-1]

    healer = ViewHealer({"hv1": (lambda: present[0], make)})
    before = _counts("hv1")
    assert not healer.healing()
    assert healer.check() == {"hv1": "rebuilding"}
    assert healer.check() == {"hv1": "rebuilding"}  # still running: not started again
    assert healer.healing()
    assert len(made) == 1
    assert metric("outbox_view_rebuild_in_progress", view="hv1") == 1
    release.set()
    healer.wait(5)
    present[0] = True
    assert healer.check() == {"hv1": "ok"}
    assert not healer.healing()
    assert _delta(before, "hv1") == {"lost": 1, "succeeded": 1}
    assert metric("outbox_view_rebuild_in_progress", view="hv1") == 0
    assert healer.report() == {"hv1": {"state": "ok", "last_rebuild": "succeeded"}}


def test_a_failed_rebuild_is_tried_again_within_the_same_loss():
    release = threading.Event()
    release.set()
    outcomes = iter([RuntimeError("broker gone"), None])
    healer = ViewHealer({"hv2": (lambda: False,
                                 lambda: ScriptedRebuild(next(outcomes), release))})
    before = _counts("hv2")
    healer.check()
    healer.wait(5)
    assert healer.report()["hv2"]["last_rebuild"] == "failed"
    healer.check()
    healer.wait(5)
    assert _delta(before, "hv2") == {"lost": 1, "failed": 1, "succeeded": 1}


def test_a_view_rebuilt_elsewhere_is_left_to_that_process():
    release = threading.Event()
    release.set()
    healer = ViewHealer({"hv3": (lambda: False, lambda: ScriptedRebuild(
        RebuildBusy("another rebuild holds the lock"), release))})
    before = _counts("hv3")
    healer.check()
    healer.wait(5)
    assert _delta(before, "hv3") == {"lost": 1, "locked": 1}


def test_a_store_that_cannot_be_asked_is_not_a_loss():
    def unreachable() -> bool:
        raise ConnectionError("refused")

    made: list[object] = []
    healer = ViewHealer({"hv4": (unreachable, lambda: made.append(1)),
                         "hv5": (lambda: None, lambda: made.append(1))})
    before = _counts("hv4")
    assert healer.check() == {"hv4": "unknown", "hv5": "unknown"}
    assert made == [] and _delta(before, "hv4") == {}


def test_stop_interrupts_the_rebuild_in_progress():
    healer = ViewHealer({"hv6": (lambda: False,
                                 lambda: ScriptedRebuild(None, threading.Event()))})
    before = _counts("hv6")
    healer.check()
    wait_for(lambda: metric("outbox_view_rebuild_in_progress", view="hv6") == 1,
             timeout_s=5, what="the rebuild running")
    healer.stop(5)
    assert _delta(before, "hv6") == {"lost": 1, "interrupted": 1}


def test_each_view_of_each_outbox_has_its_own_rebuild_lock():
    a = RuntimeSettings(db_schema="a", database_url="postgresql://x/y")
    b = RuntimeSettings(db_schema="b", database_url="postgresql://x/y")
    names = {rebuild_lock_name(s, v) for s in (a, b) for v in ("search", "cache")}
    assert len(names) == 4
