"""The README stays a short front page: at most 200 lines, `make demo` the first command a
newcomer reads, and every relative link pointing at a file of the repository."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MAX_LINES = 200
# [text](target) and ![alt](target); the target ends at the first space or closing bracket.
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def _commands(text: str) -> list[str]:
    """The command lines of the README's shell blocks, in order."""
    commands = []
    for block in re.findall(r"^```(?:sh|bash|shell|console)\n(.*?)^```", text, re.M | re.S):
        for line in block.splitlines():
            line = line.split("#", 1)[0].strip().removeprefix("$ ")
            if line:
                commands.append(line)
    return commands


def test_the_readme_is_at_most_200_lines() -> None:
    lines = README.read_text().splitlines()
    assert len(lines) <= MAX_LINES, f"README.md has {len(lines)} lines; move detail into docs/"


def test_make_demo_is_the_first_command() -> None:
    text = README.read_text()
    commands = _commands(text)
    assert commands, "README.md has no shell block"
    assert commands[0] == "make demo"
    # No inline command before it either.
    before = text[:text.index("\nmake demo")]
    assert set(re.findall(r"`make ([a-z-]+)", before)) <= {"demo"}


def test_every_relative_link_points_at_an_existing_file() -> None:
    targets = LINK.findall(README.read_text())
    relative = [t for t in targets if not re.match(r"[a-z][a-z0-9+.-]*:|#", t)]
    assert relative, "no relative link found: the pattern no longer matches the README's links"
    missing = [t for t in relative if not (ROOT / t.split("#", 1)[0]).exists()]
    assert missing == []


def test_links_are_recognised() -> None:
    """The link pattern itself, on the forms the README uses."""
    text = "[a](docs/index.md) ![b](docs/x.png) [c](https://example.com/) [d](docs/y.md#z)"
    assert LINK.findall(text) == ["docs/index.md", "docs/x.png", "https://example.com/",
                                  "docs/y.md#z"]
