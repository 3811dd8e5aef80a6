"""The installed distribution, its version, and whether one of its extras is installed.

`pip install outbox-sidecar` installs the core only; the example application's processes need
an extra (`pip install 'outbox-sidecar[ocr]'`). A command or projector that needs one checks
it first, so that a missing extra is one clear line naming what to install, not an
ImportError from deep inside a client.
"""

from __future__ import annotations

import re
from importlib.metadata import PackageNotFoundError, distribution

DISTRIBUTION = "outbox-sidecar"

_NAME = re.compile(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[([^\]]*)\])?")
_EXTRA_MARKER = re.compile(r"""extra\s*==\s*["']([^"']+)["']""")


class ExtraMissing(RuntimeError):
    """A command or projector needs an extra whose packages are not installed."""

    def __init__(self, what: str, extra: str, missing: list[str],
                 dist: str = DISTRIBUTION) -> None:
        self.extra = extra
        self.missing = missing
        super().__init__(f"{what} needs the {extra!r} extra ({', '.join(missing)} not "
                         f"installed): pip install '{dist}[{extra}]'")


def _normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


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
    for requirement in requires:
        requirement_spec, _, marker = requirement.partition(";")
        if extra not in _EXTRA_MARKER.findall(marker):
            continue
        match = _NAME.match(requirement_spec)
        if match is None:
            continue
        name, extras = match.group(1), match.group(2)
        if _normalized(name) == _normalized(dist):  # `dist[a,b]`: its own extras a and b
            for inner in (extras or "").split(","):
                if inner.strip() and inner.strip() != extra:
                    missing += [m for m in missing_requirements(inner.strip(), dist)
                                if m not in missing]
        elif not _installed(name) and name not in missing:
            missing.append(name)
    return missing


def require_extra(what: str, extra: str, dist: str = DISTRIBUTION) -> None:
    """Raise ExtraMissing, naming `what` needs it, when `extra` of `dist` is not installed."""
    missing = missing_requirements(extra, dist)
    if missing:
        raise ExtraMissing(what, extra, missing, dist)
