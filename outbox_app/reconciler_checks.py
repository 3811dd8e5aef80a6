"""The checks the reconciler runs after each round's deadline repairs, in list order.

Each is a name and a callable that decides by itself whether it has work this round (a
continuous-audit pass runs once an interval, whichever reconciler gets to it) and returns
what it did by kind. One that fails is logged and counted; the others still run.
"""

from __future__ import annotations

import threading

import redis
from botocore.client import BaseClient
from elasticsearch import Elasticsearch
from sqlalchemy.engine import Engine

from outbox_app.continuous_audit import ContinuousAudit
from outbox_app.reconciler import RoundCheck
from outbox_app.settings import AppSettings
from outbox_app.view_healing import ViewHealer, builtin_views


def round_checks(settings: AppSettings, engine: Engine, s3: BaseClient,
                 stop: threading.Event | None = None) -> list[tuple[str, RoundCheck]]:
    """The reconciler's per-round checks for these settings; `stop` (the reconciler's)
    interrupts a view rebuild in progress."""
    # A lost view (search alias gone, task cache flushed) is rebuilt from the log on a
    # thread of its own; the check itself is two cheap requests.
    healer = ViewHealer(builtin_views(settings, Elasticsearch(settings.es_url),
                                      redis.Redis.from_url(settings.redis_url)), stop)
    checks: list[tuple[str, RoundCheck]] = [("view_healing", healer.run_round)]
    # Drift is judged last: a lost view must be back before its documents are compared.
    if settings.reconciler_audit_interval_s > 0:
        audit = ContinuousAudit(settings, engine, Elasticsearch(settings.es_url),
                                redis.Redis.from_url(settings.redis_url), s3)
        # While a view is lost or rebuilt, every document would look missing: the pass waits
        # for the view instead of resyncing images the rebuild brings back anyway.
        checks.append(("continuous_audit",
                       lambda: {} if healer.healing() else audit.run_due()))
    return checks
