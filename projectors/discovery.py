"""Finding the installed projectors: the entry-point group `outbox.projectors`, one entry
point per projector, named as the projector and loading its `ProjectorSpec`.

Names come from the installed distributions' metadata without importing anything, so the
command line can list them cheaply; a spec is loaded only to run or rebuild it.
"""

from __future__ import annotations

from collections.abc import Iterable
from importlib.metadata import EntryPoint, entry_points
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from projectors.spec import ProjectorSpec

GROUP = "outbox.projectors"


class ProjectorNotFound(LookupError):
    """No installed projector has this name."""

    def __init__(self, name: str, installed: list[str]) -> None:
        self.name = name
        self.installed = installed
        listed = ", ".join(installed) or "none"
        super().__init__(f"unknown projector {name!r}; installed projectors: {listed}")


class ProjectorConflict(RuntimeError):
    """Two installed entry points declare one projector name, or a spec is not what its
    entry point promises."""


def _entry_points(found: Iterable[EntryPoint] | None) -> dict[str, EntryPoint]:
    """The group's entry points by name; a name declared twice (to different objects) is
    refused rather than one of them picked."""
    by_name: dict[str, EntryPoint] = {}
    for ep in entry_points(group=GROUP) if found is None else found:
        seen = by_name.get(ep.name)
        if seen is not None and seen.value != ep.value:
            raise ProjectorConflict(f"projector {ep.name!r} is declared twice: "
                                    f"{seen.value} and {ep.value}")
        by_name[ep.name] = ep
    return by_name


def projector_names(found: Iterable[EntryPoint] | None = None) -> list[str]:
    """The installed projectors' names, sorted (nothing is imported)."""
    return sorted(_entry_points(found))


def _load(name: str, eps: dict[str, EntryPoint]) -> ProjectorSpec:
    from projectors.spec import ProjectorSpec  # the runtime's types: only when loading

    if name not in eps:
        raise ProjectorNotFound(name, sorted(eps))
    spec = eps[name].load()
    if not isinstance(spec, ProjectorSpec):
        raise ProjectorConflict(f"entry point {name!r} ({eps[name].value}) is not a "
                                f"ProjectorSpec but {type(spec).__name__}")
    if spec.name != name:
        raise ProjectorConflict(f"entry point {name!r} loads the spec of {spec.name!r}")
    return spec


def load_spec(name: str, found: Iterable[EntryPoint] | None = None) -> ProjectorSpec:
    """The spec of projector `name`, to run it. Raises ProjectorNotFound (listing the
    installed ones), ProjectorConflict, or outbox.extras.ExtraMissing when the extra it
    needs is not installed."""
    from outbox.extras import require_extra

    eps = _entry_points(found)
    spec = _load(name, eps)
    dist = eps[name].dist
    if spec.extra is not None and dist is not None:
        require_extra(f"projector {name!r}", spec.extra, dist.name)
    return spec


def load_specs(found: Iterable[EntryPoint] | None = None) -> dict[str, ProjectorSpec]:
    """Every installed projector's spec by name, whether or not the extras they need are
    installed. Raises ProjectorConflict when two declare one name or one metrics port."""
    eps = _entry_points(found)
    specs = {name: _load(name, eps) for name in eps}
    ports: dict[int, str] = {}
    for spec in specs.values():
        if spec.metrics_port in ports:
            raise ProjectorConflict(f"projectors {ports[spec.metrics_port]!r} and "
                                    f"{spec.name!r} both default to port {spec.metrics_port}")
        ports[spec.metrics_port] = spec.name
    return dict(sorted(specs.items()))
