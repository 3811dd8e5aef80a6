"""Where settings come from besides the environment: a TOML configuration file (named by
`OUTBOX_CONFIG_FILE`) and secrets in files (`<VARIABLE>_FILE`, as Docker and Kubernetes
mount them).

Priority, highest first: arguments, environment variables, `<VARIABLE>_FILE`, the
configuration file, defaults.
"""

from __future__ import annotations

import os
import tomllib
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import AliasChoices, SecretStr
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource

CONFIG_FILE_VARIABLE = "OUTBOX_CONFIG_FILE"
FILE_SUFFIX = "_FILE"


class ConfigurationError(ValueError):
    """The configuration cannot be read: a file missing or malformed, a value given twice,
    an unknown name."""


class Secret:
    """`Annotated` marker of a secret-bearing setting (a password, or a URL that may hold
    one): it may be read from `<VARIABLE>_FILE`, and it is masked when shown."""

    def __repr__(self) -> str:
        return "SECRET"


SECRET = Secret()


def _types(field: FieldInfo) -> tuple[Any, ...]:
    """The field's type, or each member of an optional or union type."""
    if typing.get_origin(field.annotation) in (typing.Union, types.UnionType):
        return typing.get_args(field.annotation)
    return (field.annotation,)


def is_secret(field: FieldInfo) -> bool:
    """Whether a setting holds a secret: marked SECRET, or typed SecretStr."""
    return any(m is SECRET for m in field.metadata) or SecretStr in _types(field)


def is_table(field: FieldInfo) -> bool:
    """Whether a setting is a mapping (a TOML table; `<VARIABLE>__<KEY>` variables)."""
    return any(typing.get_origin(t) is dict or t is dict for t in _types(field))


def env_names(settings_cls: type[BaseSettings], name: str, field: FieldInfo) -> list[str]:
    """The environment variables of a setting, upper case (the environment is read case
    insensitively), the documented one first."""
    alias = field.validation_alias
    if isinstance(alias, str):
        choices: list[Any] = [alias]
    elif isinstance(alias, AliasChoices):
        choices = alias.choices
    else:
        choices = [f"{settings_cls.model_config.get('env_prefix', '')}{name}"]
    names = [c.upper() for c in choices if isinstance(c, str)]
    return sorted(set(names), key=names.index)


def input_key(name: str, field: FieldInfo) -> str:
    """The key a source gives a setting's value under (its alias, when it has one)."""
    alias = field.validation_alias
    if isinstance(alias, str):
        return alias
    if isinstance(alias, AliasChoices) and isinstance(alias.choices[0], str):
        return alias.choices[0]
    return name


def upper_environ(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment with upper-case names, empty values left out (an empty variable
    counts as unset, as the settings classes read it)."""
    env = os.environ if environ is None else environ
    return {k.upper(): v for k, v in env.items() if v != ""}


def read_secret_file(variable: str, path: str) -> str:
    """The secret in the file named by `variable` (`<VARIABLE>_FILE`), without the trailing
    newline an editor or `echo` leaves."""
    try:
        value = Path(path).read_text().rstrip("\r\n")
    except OSError as exc:
        raise ConfigurationError(f"{variable}={path}: cannot read it "
                                 f"({exc.strerror or exc})") from None
    if not value:
        raise ConfigurationError(f"{variable}={path}: the file is empty")
    return value


def load_config_file(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The configuration file's settings (`OUTBOX_CONFIG_FILE`); empty when none is named."""
    path = upper_environ(environ).get(CONFIG_FILE_VARIABLE)
    if not path:
        return {}
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as exc:
        raise ConfigurationError(f"{CONFIG_FILE_VARIABLE}={path}: cannot read it "
                                 f"({exc.strerror or exc})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigurationError(f"{CONFIG_FILE_VARIABLE}={path}: not valid TOML: {exc}"
                                 ) from None


class SecretFileSource(PydanticBaseSettingsSource):
    """Secret-bearing settings from `<VARIABLE>_FILE`; setting both is an error, since
    neither would be sure to win."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        """Unused: `__call__` reads every field at once."""
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        env = upper_environ()
        values: dict[str, Any] = {}
        for name, field in self.settings_cls.model_fields.items():
            if not is_secret(field):
                continue
            for variable in env_names(self.settings_cls, name, field):
                path = env.get(variable + FILE_SUFFIX)
                if path is None:
                    continue
                if variable in env:
                    raise ConfigurationError(f"{variable} and {variable}{FILE_SUFFIX} are both "
                                             "set: keep one")
                values[input_key(name, field)] = read_secret_file(variable + FILE_SUFFIX, path)
        return values


class ConfigFileSource(PydanticBaseSettingsSource):
    """The settings of this class found in the configuration file (keys are the settings'
    names, `database_url = "..."`; the file may hold other packages' settings too)."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        """Unused: `__call__` reads every field at once."""
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        data = load_config_file()
        return {input_key(name, field): data[name]
                for name, field in self.settings_cls.model_fields.items() if name in data}
