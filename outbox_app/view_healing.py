"""A lost view rebuilds itself, with no command typed.

`ViewHealer.check` runs once per reconciler round (`outbox reconcile`) and asks of each
rebuildable built-in view whether it is still there:

- search: the alias `es_index` exists. Deleting the live index removes its alias too; the
  live search projector then waits (its writes require the alias) until the alias is back.
- task cache: the marker key `<prefix>:task-cache-marker` exists. It is written when the
  cache is born and by every rebuild of it, never by the projector's writes, so a flushed or
  restarted Redis (it keeps no data) has lost it even once the projector has written the
  keys of newer events again.

A missing view counts as lost only once its live projector has committed a position: before
that it was never built (the search projector makes its alias at its first batch; the
healer writes the marker of a cache that never held anything). A lost view is rebuilt from
the log behind its live name by the same procedure as `outbox rebuild <view>`
(`projectors.rebuild`), on a thread of its own, so the reconciler's rounds go on meanwhile.
The rebuild's advisory lock (`projectors.rebuild_lock`) lets one process at a time rebuild a
view: a reconciler that finds it held (another reconciler, or a person running `outbox
rebuild`) leaves the view to the holder and looks again next round. A rebuild interrupted
by SIGTERM or SIGKILL is resumed by the next one (its unfinished copy is marked so).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import redis
import structlog
from elasticsearch import Elasticsearch
from prometheus_client import Counter, Gauge

from outbox.wire_formats import event_topic
from outbox_app.settings import ProjectorSettings
from outbox_app.view_rebuilds import CacheRebuild, SearchRebuild
from outbox_app.views.search import SearchProjector
from outbox_app.views.task_cache import TaskCache, TaskCacheProjector
from projectors.rebuild import Rebuild, committed
from projectors.rebuild_lock import RebuildBusy
from projectors.runtime import live_group

log = structlog.get_logger(__name__)

VIEW_LOST = Counter("outbox_view_lost_total",
                    "views found lost (search alias or index gone, task cache flushed)",
                    ["view"])
VIEW_REBUILDS = Counter(
    "outbox_view_rebuilds_total",
    "automatic rebuilds of a lost view, by outcome (succeeded, failed, interrupted; locked: "
    "another process held the view's rebuild lock)", ["view", "outcome"])
REBUILD_IN_PROGRESS = Gauge("outbox_view_rebuild_in_progress",
                            "rebuilds of the view this process runs now (0 or 1)", ["view"])
OUTCOMES = ("succeeded", "failed", "interrupted", "locked")

# True: the view is there; False: it is lost; None: it cannot be told now.
ViewProbe = Callable[[], bool | None]


@dataclass
class HealedView:
    """One view the healer watches, and what it last found."""

    probe: ViewProbe
    make_rebuild: Callable[[], Rebuild]
    state: str = "unknown"  # ok, lost, rebuilding, unknown
    lost: bool = False  # within a loss, from its detection until the view is back
    rebuild: Rebuild | None = None
    thread: threading.Thread | None = None
    last_outcome: str | None = None


class ViewHealer:
    """Notices lost views and rebuilds them (see the module doc). `views`: name -> (probe,
    a factory of the view's rebuild); `stop`: the process's stop event, which interrupts a
    rebuild in progress (it resumes at the next one)."""

    def __init__(self, views: Mapping[str, tuple[ViewProbe, Callable[[], Rebuild]]],
                 stop: threading.Event | None = None) -> None:
        self._views = {name: HealedView(probe, make) for name, (probe, make) in views.items()}
        self._stop = stop or threading.Event()
        for name in self._views:  # at zero, so an alert's increase() sees the first one
            VIEW_LOST.labels(name)
            for outcome in OUTCOMES:
                VIEW_REBUILDS.labels(name, outcome)
            REBUILD_IN_PROGRESS.labels(name)

    def check(self) -> dict[str, str]:
        """Look at every view once; start the rebuild of a lost one that this process is not
        rebuilding already. Never raises (a store that cannot be asked is `unknown`)."""
        for name, view in self._views.items():
            if view.thread is not None and view.thread.is_alive():
                view.state = "rebuilding"
                continue
            try:
                present = view.probe()
            except Exception as exc:  # the store is down: its own outage, not a loss
                log.warning("view_check_failed", view=name, error=f"{type(exc).__name__}")
                present = None
            if present is None:
                view.state = "unknown"
            elif present:
                if view.lost:
                    log.info("view_back", view=name)
                view.state, view.lost = "ok", False
            else:
                if not view.lost:
                    VIEW_LOST.labels(name).inc()
                    log.warning("view_lost", view=name)
                view.state, view.lost = "lost", True
                self._start(name, view)
        return self.states()

    def run_round(self) -> dict[str, int]:
        """`check`, as one of the reconciler's per-round checks: the views whose rebuild
        this round started (`<view>_rebuild_started`)."""
        running = {n for n, v in self._views.items() if v.thread and v.thread.is_alive()}
        self.check()
        return {f"{n}_rebuild_started": 1 for n, v in self._views.items()
                if n not in running and v.thread is not None and v.thread.is_alive()}

    def healing(self) -> bool:
        """Whether a view was found lost and is not back yet (its documents say nothing)."""
        return any(view.lost for view in self._views.values())

    def states(self) -> dict[str, str]:
        """Each view's state as last checked: ok, lost, rebuilding or unknown."""
        return {name: view.state for name, view in self._views.items()}

    def report(self) -> dict[str, dict[str, Any]]:
        """Each view's state and the outcome of the last rebuild this process tried."""
        return {name: {"state": v.state, "last_rebuild": v.last_outcome}
                for name, v in self._views.items()}

    def stop(self, timeout_s: float = 60.0) -> None:
        """Interrupt the rebuilds in progress (each resumes at the next one) and wait."""
        self._stop.set()
        self.wait(timeout_s)

    def wait(self, timeout_s: float | None = None) -> None:
        """Wait for the rebuilds in progress to end (tests, and a `--once` round)."""
        for view in self._views.values():
            if view.thread is not None:
                view.thread.join(timeout_s)

    def _start(self, name: str, view: HealedView) -> None:
        if self._stop.is_set():
            return
        view.rebuild = view.make_rebuild()
        view.state = "rebuilding"
        # Not a daemon: a stopping process lets the rebuild commit what it applied.
        view.thread = threading.Thread(target=self._rebuild, args=(name, view),
                                       name=f"rebuild-{name}")
        view.thread.start()
        threading.Thread(target=self._interrupt_on_stop, args=(view.rebuild, view.thread),
                         name=f"rebuild-{name}-stop", daemon=True).start()

    def _interrupt_on_stop(self, rebuild: Rebuild, thread: threading.Thread) -> None:
        while thread.is_alive():
            if self._stop.wait(0.5):
                rebuild.stop.set()
                return

    def _rebuild(self, name: str, view: HealedView) -> None:
        assert view.rebuild is not None
        REBUILD_IN_PROGRESS.labels(name).inc()
        log.warning("view_rebuild_started", view=name)
        try:
            summary = view.rebuild.run()
            outcome = "succeeded"
            log.warning("view_rebuilt", **{k: v for k, v in summary.items() if k != "view"},
                        view=name)
        except RebuildBusy as exc:
            outcome = "locked"
            log.info("view_rebuild_elsewhere", view=name, reason=str(exc))
        except InterruptedError:
            outcome = "interrupted"
            log.info("view_rebuild_interrupted", view=name)
        except Exception as exc:  # the next round tries again, resuming what was built
            outcome = "failed"
            log.error("view_rebuild_failed", view=name, error=f"{type(exc).__name__}: {exc}")
        finally:
            REBUILD_IN_PROGRESS.labels(name).dec()
        VIEW_REBUILDS.labels(name, outcome).inc()
        view.last_outcome = outcome


def ever_applied(settings: ProjectorSettings, view: str, aggregate_types: Sequence[str]
                 ) -> bool:
    """Whether the live projector of `view` has committed a position (so its view was
    built, and a missing view was lost)."""
    topics = [event_topic(settings, t) for t in aggregate_types]
    return any(committed(settings, live_group(settings, view), topics).values())


def builtin_views(settings: ProjectorSettings, es: Elasticsearch, client: redis.Redis
                  ) -> dict[str, tuple[ViewProbe, Callable[[], Rebuild]]]:
    """The probes and rebuilds of the search view and the task cache."""
    marker = TaskCache(settings, client).marker_key

    def search_there() -> bool:
        # One HEAD request a round; the log is asked only when the alias is missing.
        if es.indices.exists_alias(name=settings.es_index):
            return True
        return not ever_applied(settings, SearchProjector.name, SearchProjector.aggregate_types)

    def cache_there() -> bool:
        if client.exists(marker):
            return True
        if ever_applied(settings, TaskCacheProjector.name, TaskCacheProjector.aggregate_types):
            return False
        client.set(marker, "born", nx=True)  # a cache that never held anything
        return True

    return {"search": (search_there, lambda: SearchRebuild(settings, es)),
            "cache": (cache_there, lambda: CacheRebuild(settings, client))}
