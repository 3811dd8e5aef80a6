"""What `outbox config` shows: each setting's value and where it came from (default, file,
environment, file-secret), secrets masked."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import urlsplit

from pydantic import SecretStr
from pydantic_core import PydanticUndefined

from outbox.settings_registry import Setting
from outbox.settings_sources import (
    FILE_SUFFIX,
    is_table,
    read_secret_file,
    upper_environ,
)

MASK = "********"
# Keys of a table setting (Kafka client properties) whose values are secrets.
SECRET_KEY = re.compile(r"password|secret|token|credential|jaas|pem", re.IGNORECASE)


def mask(value: Any, secret: bool) -> Any:
    """A value fit to show: a secret is masked, a URL only in its password; in a table,
    the values whose key names a secret."""
    if isinstance(value, SecretStr):
        value = value.get_secret_value()
    if isinstance(value, dict):
        return {k: MASK if SECRET_KEY.search(str(k)) else mask(v, secret)
                for k, v in value.items()}
    if not secret or value is None or value == "":
        return value
    text = str(value)
    parts = urlsplit(text)
    if parts.scheme and parts.netloc:
        if parts.password is None:
            return text
        netloc = parts.netloc.replace(f":{parts.password}@", f":{MASK}@", 1)
        return parts._replace(netloc=netloc).geturl()
    return MASK


def default_of(setting: Setting) -> Any:
    """The default value; PydanticUndefined when the setting is required."""
    field = setting.field
    if field.default_factory is dict:
        return {}
    if field.default_factory is not None:
        return "(computed at start; see description)"
    return field.default


def origins(settings: Mapping[str, Setting], environ: Mapping[str, str] | None = None,
            file_data: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    """Each setting's shown value and origin: environment, file-secret (`<VARIABLE>_FILE`),
    file (the configuration file), default, or missing (required, given nowhere)."""
    env = upper_environ(environ)
    data = file_data or {}
    rows = []
    for s in settings.values():
        value: Any
        found = [v for v in s.variables if v in env]
        files = [v + FILE_SUFFIX for v in s.variables if s.secret and v + FILE_SUFFIX in env]
        passed = {k[len(v) + 2:].lower(): val for v in s.variables if is_table(s.field)
                  for k, val in env.items() if k.startswith(v + "__")}
        if found:
            origin, value = "environment", env[found[0]]
        elif files:
            origin, value = "file-secret", read_secret_file(files[0], env[files[0]])
        elif passed:
            origin, value = "environment", {**data.get(s.name, {}), **passed}
            if s.name in data:
                origin = "file+environment"
        elif s.name in data:
            origin, value = "file", data[s.name]
        elif default_of(s) is PydanticUndefined:
            origin, value = "missing", None
        else:
            origin, value = "default", default_of(s)
        rows.append({"variable": s.variable, "name": s.name, "origin": origin,
                     "value": mask(value, s.secret), "secret": s.secret,
                     "source": files[0] if files else (found[0] if found else None)})
    return rows


def shown_value(value: Any) -> str:
    """A value as an operator would write it: JSON for tables and booleans, `""` for
    an empty string, `-` for none."""
    if value is None:
        return "-"
    if isinstance(value, bool | dict):
        return json.dumps(value)
    return str(value) if value != "" else '""'


def render_text(rows: Iterable[Mapping[str, Any]]) -> str:
    """The rows as aligned text, one setting a line."""
    rows = list(rows)
    width = max(len(r["variable"]) for r in rows)
    lines = [f"{'variable':{width}}  {'origin':16}  value"]
    lines += [f"{r['variable']:{width}}  {r['origin']:16}  {shown_value(r['value'])}"
              for r in rows]
    return "\n".join(lines)
