"""The package layout holds: the core knows nothing above it, and no package imports one
that imports it back."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from tests.relay_harness import ROOT

# Each package and the project packages it may import (directly or inside a function).
ALLOWED = {
    "outbox": set(),
    "relays": {"outbox"},
    "outbox_images": {"outbox"},
    "projectors": {"outbox", "outbox_images"},
    # relays: the status reads the relay's position as `outbox relay status` does.
    "outbox_app": {"outbox", "outbox_images", "projectors", "relays"},
}


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found & set(ALLOWED)


def test_packages_import_only_downward():
    wrong = []
    for package, allowed in ALLOWED.items():
        for path in sorted((ROOT / package).rglob("*.py")):
            extra = _imports(path) - allowed - {package}
            if extra:
                wrong.append(f"{path.relative_to(ROOT)} imports {sorted(extra)}")
    assert wrong == []


def test_the_allowed_graph_has_no_cycle():
    def reaches(start: str, goal: str, seen: frozenset = frozenset()) -> bool:
        return any(dep == goal or (dep not in seen and reaches(dep, goal, seen | {dep}))
                   for dep in ALLOWED[start])

    assert [p for p in ALLOWED if reaches(p, p)] == []


def test_the_core_knows_nothing_of_images():
    word = re.compile(r"\bimages?\b", re.IGNORECASE)
    hits = [f"{p.relative_to(ROOT)}:{n}" for p in (ROOT / "outbox").rglob("*")
            if p.suffix in {".py", ".json"}
            for n, line in enumerate(p.read_text().splitlines(), 1) if word.search(line)]
    assert hits == []
