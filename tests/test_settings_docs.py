"""The settings reference of the documentation site is generated from the settings classes,
and no document or deploy file names a variable that does not exist: neither can drift."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from types import ModuleType

import pytest
import yaml

from outbox.settings_registry import (
    OTHER_VARIABLES,
    documented_classes,
    installed_classes,
    known_variables,
    settings_of,
)

ROOT = Path(__file__).resolve().parents[1]
HOOK = ROOT / "docs" / "hooks" / "reference.py"
NAMING_FILES = [ROOT / "README.md", ROOT / "Makefile", ROOT / "infra" / "stack.sh",
                *sorted((ROOT / "docs").rglob("*.md")),
                *sorted((ROOT / "infra").rglob("*.yaml"))]


def load_hook() -> ModuleType:
    """The MkDocs hook that generates the reference pages, loaded as the build loads it."""
    spec = importlib.util.spec_from_file_location("docs_reference_hook", HOOK)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_settings_reference_lists_every_setting() -> None:
    hook = load_hook()
    page = hook.settings_markdown()
    row = re.compile(r"^\| <span id=\"[^\"]+\"></span>`(\w+)`.*$", re.M)
    rows = {m.group(1): m.group(0) for m in row.finditer(page)}
    settings = settings_of(documented_classes())
    assert sorted(rows) == sorted(s.variable for s in settings.values())
    for s in settings.values():
        if s.variable.lower() != f"outbox_{s.name}":
            assert f"file key `{s.name}`" in rows[s.variable], s.variable
        assert hook._cell(s.field.description or "") in rows[s.variable], s.variable
    for variable in OTHER_VARIABLES:
        assert f"| `{variable}` |" in page


def test_required_settings_are_marked_required() -> None:
    page = load_hook().settings_markdown()
    start = '| <span id="outbox_database_url">'
    row = next(line for line in page.splitlines() if line.startswith(start))
    assert "**required**" in row
    assert "OUTBOX_DATABASE_URL_FILE" in row  # a secret, also read from a file


def test_the_site_generates_the_reference_pages_with_the_hook() -> None:
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    assert "docs/hooks/reference.py" in config["hooks"]
    nav = yaml.safe_dump(config["nav"])
    hook = load_hook()
    assert hook.SETTINGS_PAGE in nav and hook.CLI_PAGE in nav


@pytest.mark.parametrize("path", NAMING_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_file_names_a_variable_that_does_not_exist(path: Path) -> None:
    known, prefixes = known_variables(settings_of(installed_classes()))
    text = path.read_text()
    # A misspelling shown as the example of the error it causes is meant not to exist.
    examples = set(re.findall(r"\b(OUTBOX_[A-Z0-9_]*): unknown setting", text))
    named = set(re.findall(r"\bOUTBOX_[A-Z0-9_]*", text)) - examples
    unknown = sorted(
        name for name in named
        if name not in known and not name.startswith(prefixes)
        # a family written as OUTBOX_DEADLINE_<STATE>_S, or OUTBOX_* itself
        and not (name.endswith("_") and any(k.startswith(name) for k in known)))
    assert unknown == []
