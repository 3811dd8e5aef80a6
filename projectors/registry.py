"""Running an installed projector by name (`outbox project <name>`): its spec's factory,
probes and outage classifier wired into the consumer runtime."""

from __future__ import annotations

import threading

from outbox.observability import serve_until_stopped
from projectors.discovery import load_spec
from projectors.runtime import ConsumerRuntime
from projectors.settings import RuntimeSettings
from projectors.spec import ProjectorSpec
from projectors.transient_errors import transient_check


def build_runtime(settings: RuntimeSettings, projector: str | ProjectorSpec, *,
                  group_id: str | None = None, stop: threading.Event | None = None
                  ) -> ConsumerRuntime:
    """The consumer runtime of `projector` (an installed name, or a spec)."""
    spec = load_spec(projector) if isinstance(projector, str) else projector
    stop = stop or threading.Event()
    abandon = threading.Event()
    instance = spec.factory(settings, lambda: stop.is_set() or abandon.is_set())
    return ConsumerRuntime(settings, instance, group_id=group_id, stop=stop,
                           abandon=abandon, sink_probes=spec.probes(settings),
                           transient=transient_check(spec.transient))


def serve_projector(settings: RuntimeSettings, spec: ProjectorSpec, host: str, port: int
                    ) -> int:
    """Run one projector until SIGTERM (the batch in hand is finished and committed)."""
    runtime = build_runtime(settings, spec)
    return serve_until_stopped(runtime.stop, runtime.health, host, port, runtime.run,
                               ready=runtime.readiness, stalled=runtime.stalled)
