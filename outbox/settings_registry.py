"""Every setting this installation knows, and the checks that use them: an unknown
`OUTBOX_*` variable or configuration-file key is an error naming the closest known one, and
a settings class's validation error becomes one line per setting, under its variable's name.

The core imports no package built on it: their settings classes are found through the
entry-point group `outbox.settings` (one entry point per class) and through the installed
projectors' specs (group `outbox.projectors`, attribute `settings`).
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any

from pydantic import ValidationError
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings

from outbox.settings import Settings
from outbox.settings_sources import (
    CONFIG_FILE_VARIABLE,
    FILE_SUFFIX,
    env_names,
    input_key,
    is_secret,
    is_table,
    upper_environ,
)

SETTINGS_GROUP = "outbox.settings"
PROJECTORS_GROUP = "outbox.projectors"
PREFIX = "OUTBOX_"

_STACK = "read by infra/stack.sh (the local stack), not by the processes: "
# OUTBOX_ variables that are not settings of a process, and why each exists.
OTHER_VARIABLES: dict[str, str] = {
    CONFIG_FILE_VARIABLE: "the configuration file (TOML); `outbox --config PATH` sets it",
    "OUTBOX_KAFKA_PID_FILE": "written to .outbox/env by infra/stack.sh: the local broker's "
                             "PID file, for the tests that stop and restart it",
    "OUTBOX_PG_SOCKET_DIR": "written to .outbox/env by infra/stack.sh: the local "
                            "PostgreSQL's socket directory, for the tests' superuser access",
    "OUTBOX_STATE_DIR": _STACK + "where the stack keeps its data",
    "OUTBOX_VENV": _STACK + "the virtualenv holding the servers' packages",
    "OUTBOX_PG_DIR": _STACK + "the PostgreSQL cluster's directory",
    "OUTBOX_PG_PORT": _STACK + "PostgreSQL's port",
    "OUTBOX_REDIS_PORT": _STACK + "Redis's port",
    "OUTBOX_KAFKA_PORT": _STACK + "the broker's port",
    "OUTBOX_ES_PORT": _STACK + "the search server's port",
    "OUTBOX_S3_PORT": _STACK + "the S3 server's port",
    "OUTBOX_KAFKA_STORAGE": _STACK + "the broker's storage, s3 or memory",
    "OUTBOX_FAULTS_SCALE": "the test suite: `full` runs the long fault suite",
    "OUTBOX_FUZZ_EXAMPLES": "the test suite: examples per operation of the API fuzz test",
    "OUTBOX_WRITE_SCREENSHOT": "the test suite: 1 rewrites the status page's screenshot",
}


@dataclass(frozen=True)
class Setting:
    """One setting: its field in the first class that has it, and its variables."""

    name: str
    owner: type
    field: FieldInfo
    variables: tuple[str, ...]

    @property
    def variable(self) -> str:
        """The documented variable."""
        return self.variables[0]

    @property
    def secret(self) -> bool:
        """Whether the value is secret (masked; also read from `<VARIABLE>_FILE`)."""
        return is_secret(self.field)


def _load(group: str) -> list[Any]:
    loaded = []
    for ep in sorted(entry_points(group=group), key=lambda e: e.name):
        try:
            loaded.append(ep.load())
        except Exception:
            continue
    return loaded


def documented_classes() -> list[type[BaseSettings]]:
    """The core's settings class and those registered in `outbox.settings`: the settings
    the documentation's settings reference lists."""
    classes: list[type[BaseSettings]] = [Settings]
    for cls in _load(SETTINGS_GROUP):
        if isinstance(cls, type) and issubclass(cls, BaseSettings) and cls not in classes:
            classes.append(cls)
    return classes


def installed_classes() -> list[type[BaseSettings]]:
    """Every settings class of this installation: the documented ones plus the installed
    projectors' (a projector of another package brings its own)."""
    classes = documented_classes()
    for spec in _load(PROJECTORS_GROUP):
        cls = getattr(spec, "settings", None)
        if isinstance(cls, type) and issubclass(cls, BaseSettings) and cls not in classes:
            classes.append(cls)
    return classes


def settings_of(classes: Iterable[type[BaseSettings]]) -> dict[str, Setting]:
    """Every setting of these classes by name, in declaration order (the first class that
    has a field describes it)."""
    found: dict[str, Setting] = {}
    for cls in classes:
        for name, field in cls.model_fields.items():
            if name not in found:
                found[name] = Setting(name, _declaring_class(cls, name), field,
                                      tuple(env_names(cls, name, field)))
    return found


def _declaring_class(cls: type[BaseSettings], name: str) -> type:
    for base in reversed(cls.__mro__):
        if name in getattr(base, "__annotations__", {}):
            return base
    return cls


def known_variables(settings: Mapping[str, Setting]) -> tuple[set[str], tuple[str, ...]]:
    """The known `OUTBOX_*` (and other settings') variable names, and the prefixes of the
    table settings' `<VARIABLE>__<KEY>` pass-through variables."""
    names = set(OTHER_VARIABLES)
    prefixes = []
    for s in settings.values():
        names.update(s.variables)
        if s.secret:
            names.update(v + FILE_SUFFIX for v in s.variables)
        if is_table(s.field):
            prefixes.extend(v + "__" for v in s.variables)
    return names, tuple(prefixes)


def _closest(word: str, candidates: Iterable[str]) -> str:
    # Compared without the prefix they all share, which would make any two look alike.
    by_rest = {c.removeprefix(PREFIX): c for c in candidates}
    match = difflib.get_close_matches(word.removeprefix(PREFIX), sorted(by_rest), n=1,
                                      cutoff=0.6)
    return f"; did you mean {by_rest[match[0]]}?" if match else ""


def unknown_variables(settings: Mapping[str, Setting],
                      environ: Mapping[str, str] | None = None) -> list[str]:
    """One message per `OUTBOX_*` variable that no setting reads, naming the closest known
    one (a misspelt variable would otherwise be ignored, and its default used)."""
    known, prefixes = known_variables(settings)
    problems = []
    for variable in sorted(upper_environ(environ)):
        if not variable.startswith(PREFIX) or variable in known or variable.startswith(prefixes):
            continue
        base = variable.removesuffix(FILE_SUFFIX)
        if base != variable and base in known:
            problems.append(f"{variable}: {base} is not a secret, so it is not read from a "
                            f"file; set {base} itself")
        else:
            problems.append(f"{variable}: unknown setting{_closest(variable, known)}")
    return problems


def conflicting_secrets(settings: Mapping[str, Setting],
                        environ: Mapping[str, str] | None = None) -> list[str]:
    """One message per secret set both directly and through `<VARIABLE>_FILE`."""
    env = upper_environ(environ)
    return [f"{v} and {v}{FILE_SUFFIX} are both set: keep one"
            for s in settings.values() if s.secret for v in s.variables
            if v in env and v + FILE_SUFFIX in env]


def unknown_file_keys(settings: Mapping[str, Setting], data: Mapping[str, Any]) -> list[str]:
    """One message per key of the configuration file that is no setting, naming the closest
    known one."""
    return [f"{CONFIG_FILE_VARIABLE}: unknown key {key!r}{_closest(key, settings)}"
            for key in data if key not in settings]


def validation_messages(exc: ValidationError,
                        classes: Iterable[type[BaseSettings]]) -> list[str] | None:
    """A settings class's validation error as one message per setting, under the variable
    that sets it; None when the error is not a known settings class's."""
    cls = next((c for c in classes if c.__name__ == exc.title), None)
    if cls is None:
        return None
    by_key = {input_key(name, field): name for name, field in cls.model_fields.items()}
    settings = settings_of([cls])
    messages = []
    for error in exc.errors():
        key = str(error["loc"][0]) if error["loc"] else ""
        setting = settings.get(by_key.get(key, key))
        if setting is None:
            messages.append(f"invalid settings: {error['msg']}")
            continue
        where = setting.variable + "".join(f"__{str(p).upper()}" for p in error["loc"][1:])
        if error["type"] == "missing":
            messages.append(f"missing setting {where} ({describe_source(setting)})")
        else:
            given = "" if setting.secret else f" = {error.get('input')!r}"
            messages.append(f"invalid setting {where}{given}: {error['msg']}")
    return messages


def describe_source(setting: Setting) -> str:
    """How to give a setting a value, and what it is."""
    ways = [setting.variable]
    if setting.secret:
        ways.append(setting.variable + FILE_SUFFIX)
    ways.append(f"`{setting.name}` in the {CONFIG_FILE_VARIABLE}")
    what = (setting.field.description or "").split(";")[0]
    return f"{what}; set {', or '.join(ways)}" if what else f"set {', or '.join(ways)}"
