"""What a projector is, to the consumer runtime: the interface a projector implements and
the declaration (`ProjectorSpec`) that names it, once, for the command line, the runtime,
readiness and rebuild.

A package makes its projector runnable by `outbox project <name>` with an entry point in
the group `outbox.projectors` that loads its spec:

    [project.entry-points."outbox.projectors"]
    audit-log = "audit_log_projector:SPEC"
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from outbox.envelope import EventEnvelope
from outbox.readiness import Probe
from projectors.settings import RuntimeSettings
from projectors.transient_errors import TransientCheck

if TYPE_CHECKING:
    from projectors.rebuild import Progress, Rebuild

StopCheck = Callable[[], bool]


class Projector(Protocol):
    """What a projector provides to the runtime. Its set-up is its spec's factory."""

    name: str
    aggregate_types: Sequence[str]  # the topics it reads, `<prefix>.<aggregate_type>`

    def apply(self, events: list[EventEnvelope]) -> None:
        """Apply a batch (idempotently: events may be redelivered). Raise to retry: an
        outage (see `ProjectorSpec.transient`) is waited out, any other error is retried a
        few times, then the failing events go to the dead-letter topic."""
        ...

    def close(self) -> None:
        """Release clients (called once, when the runtime stops)."""
        ...


ProjectorFactory = Callable[[Any, StopCheck], Projector]
ProbesFactory = Callable[[Any], Mapping[str, Probe]]
RebuildFactory = Callable[[Any, "Callable[[Progress], None]"], "Rebuild"]


def no_probes(settings: RuntimeSettings) -> Mapping[str, Probe]:
    """No store to probe: readiness is the broker and the consumer group only."""
    return {}


@dataclass(frozen=True)
class ProjectorSpec:
    """A projector's declaration, loaded from its entry point.

    `factory(settings, should_stop)` sets the projector up (`should_stop()` turns true when
    the process stops or the batch in hand was revoked: a long batch may check it between
    items and raise `BatchInterrupted`). `settings` is the settings class the command line
    reads from the environment (`RuntimeSettings` or a subclass). `probes(settings)` returns
    the readiness probes of its stores by name (a cheap call that raises when the store is
    down). `transient` says which errors mean "the sink is down, wait": a tuple of exception
    types or a function of the exception, on top of the generic ones (lost connections,
    timeouts, SQLAlchemy's OperationalError). `rebuild(settings, on_progress)`, when given,
    builds a `projectors.rebuild.Rebuild` of its view for `outbox rebuild <name>`. `extra`
    names the extra of the distribution declaring the entry point whose packages the
    projector needs: when they are not installed, loading the spec says what to install
    (the spec's own module imports none of them).
    """

    name: str
    metrics_port: int
    factory: ProjectorFactory
    settings: type[RuntimeSettings] = RuntimeSettings
    probes: ProbesFactory = no_probes
    transient: tuple[type[BaseException], ...] | TransientCheck = ()
    rebuild: RebuildFactory | None = None
    description: str = ""
    extra: str | None = None
