"""The README's configuration table is the settings classes' own, and no document or deploy
file names a variable that does not exist: neither can drift."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from outbox.settings_registry import (
    documented_classes,
    installed_classes,
    known_variables,
    settings_of,
)
from outbox.settings_report import markdown_table, readme_table

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
NAMING_FILES = [README, ROOT / "Makefile", ROOT / "infra" / "stack.sh",
                *sorted((ROOT / "infra").rglob("*.yaml"))]


def test_the_readme_table_lists_every_setting_as_the_classes_define_it() -> None:
    expected = markdown_table(settings_of(documented_classes()))
    assert readme_table(README.read_text()) == expected, (
        "README.md's configuration table is out of date: run "
        "`outbox config --markdown --write README.md`")


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
