"""The installed distribution, its version, and whether one of its extras is installed.

`pip install outbox-sidecar` installs the core only; the example application's processes need
an extra (`pip install 'outbox-sidecar[ocr]'`). A command or projector that needs one checks
it first, so that a missing extra is one clear line naming what to install, not an
ImportError from deep inside a client.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, distribution

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

DISTRIBUTION = "outbox-sidecar"


class ExtraMissing(RuntimeError):
    """A command or projector needs an extra whose packages are not installed."""

    def __init__(self, what: str, extra: str, missing: list[str],
                 dist: str = DISTRIBUTION) -> None:
        self.extra = extra
        self.missing = missing
        super().__init__(f"{what} needs the {extra!r} extra ({', '.join(missing)} not "
                         f"installed): pip install '{dist}[{extra}]'")


def version(dist: str = DISTRIBUTION) -> str:
    """The installed version of `dist` (from its metadata), or "unknown" when it runs from a
    source tree that was never installed."""
    try:
        return distribution(dist).version
    except PackageNotFoundError:
        return "unknown (not installed)"


def _installed(name: str) -> bool:
    try:
        distribution(name)
    except PackageNotFoundError:
        return False
    return True


def missing_requirements(extra: str, dist: str = DISTRIBUTION) -> list[str]:
    """The names of the packages `extra` of `dist` requires that are not installed (the
    extras it names of its own distribution included). Empty when `dist` itself is not
    installed: nothing can be told then, and an import will say what is missing."""
    try:
        requires = distribution(dist).requires or []
    except PackageNotFoundError:
        return []
    missing: list[str] = []
    for line in requires:
        requirement = Requirement(line)
        marker = requirement.marker
        # The extra's own: true for it, false without it (a core requirement is either).
        if marker is None or not marker.evaluate({"extra": extra}) \
                or marker.evaluate({"extra": ""}):
            continue
        if canonicalize_name(requirement.name) == canonicalize_name(dist):
            # `dist[a,b]`: its own extras a and b
            for inner in sorted(requirement.extras - {extra}):
                missing += [m for m in missing_requirements(inner, dist) if m not in missing]
        elif not _installed(requirement.name) and requirement.name not in missing:
            missing.append(requirement.name)
    return missing


def require_extra(what: str, extra: str, dist: str = DISTRIBUTION) -> None:
    """Raise ExtraMissing, naming `what` needs it, when `extra` of `dist` is not installed."""
    missing = missing_requirements(extra, dist)
    if missing:
        raise ExtraMissing(what, extra, missing, dist)
