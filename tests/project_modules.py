"""The project's packages, and importing every module of them (what defines settings or
metrics registers them on import)."""

from __future__ import annotations

import importlib
import pkgutil

PACKAGES = ("outbox", "relays", "outbox_images", "projectors", "outbox_app")


def import_project_modules() -> None:
    """Import every module of the packages. The migration environments are scripts that run
    on import, and define nothing of interest: they are left out."""
    for package in PACKAGES:
        module = importlib.import_module(package)
        for info in pkgutil.walk_packages(module.__path__, f"{package}."):
            if ".migrations" not in info.name:
                importlib.import_module(info.name)
