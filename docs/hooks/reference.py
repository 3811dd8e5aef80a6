"""MkDocs hook: the CLI and settings reference pages, generated at build time from the
argparse parsers (`outbox.cli.build_parser`, with every command the entry points register)
and from the settings classes (`outbox.settings_registry`), so neither can drift from the
code. A hook rather than a plugin such as mkdocs-gen-files: it needs no dependency beyond
MkDocs, and the pages exist only in the build, never as files to keep up to date."""

from __future__ import annotations

import argparse
import html
import os
import types
import typing
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from mkdocs.config.defaults import MkDocsConfig
from mkdocs.structure.files import File, Files

CLI_PAGE = "reference/cli.md"
SETTINGS_PAGE = "reference/settings.md"
# The help text is wrapped at this width, whatever the terminal that runs the build.
HELP_COLUMNS = "100"
# Section titles of the settings classes; a class not named here is titled by its name.
SECTION_TITLES = {
    "KafkaSecuritySettings": "Kafka client security",
    "Settings": "Core: the outbox, the relays and the topics",
    "ImageSettings": "Image resources",
    "RuntimeSettings": "Projector runtime",
    "WorkerSettings": "OCR and embedding workers",
    "ProjectorSettings": "Search view and task cache",
    "AppSettings": "The image application",
}


@contextmanager
def _columns(width: str) -> Iterator[None]:
    previous = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = width
    try:
        yield
    finally:
        if previous is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = previous


def _subcommands(parser: argparse.ArgumentParser) -> list[tuple[str, str, Any]]:
    """(name, one-line help, parser) of each subcommand, in the order they were added."""
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help or "" for a in action._choices_actions}
            seen: set[int] = set()
            for name, sub in action.choices.items():
                if id(sub) not in seen:
                    seen.add(id(sub))
                    found.append((name, helps.get(name, ""), sub))
    return found


def _command_sections(parser: argparse.ArgumentParser, level: int, summary: str) -> list[str]:
    lines = [f"{'#' * level} `{parser.prog}`", ""]
    if summary:
        lines += [summary[0].upper() + summary[1:] + ".", ""]
    lines += ["```text", parser.format_help().rstrip(), "```", ""]
    for _, help_text, sub in _subcommands(parser):
        lines += _command_sections(sub, min(level + 1, 4), help_text)
    return lines


def cli_markdown() -> str:
    """The CLI reference: every command's `--help`, the registered packages' included."""
    from outbox.cli import build_parser

    with _columns(HELP_COLUMNS):
        parser = build_parser()
        lines = [
            "# Command line",
            "",
            "Generated from the command line's own parsers when the site is built, so it "
            "lists exactly what `outbox --help` shows: the core's commands and those the "
            "installed packages register through the entry-point group `outbox.commands` "
            "(here `relay`, `project` and the image application's).",
            "",
            "Every command reads the settings of the [settings reference](settings.md); a "
            "missing, invalid or unknown setting stops it with exit status 2 and one line "
            "naming the variable.",
            "",
        ]
        lines += _command_sections(parser, 2, "")
    return "\n".join(lines)


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Annotated:
        return _type_name(args[0])
    if origin is typing.Literal:
        return " or ".join(f"`{a}`" for a in args)
    if origin in (typing.Union, types.UnionType):
        names = [_type_name(a) for a in args if a is not type(None)]
        optional = " (optional)" if type(None) in args else ""
        return " or ".join(names) + optional
    if origin is dict or annotation is dict:
        return "table"
    name = getattr(annotation, "__name__", str(annotation))
    return {"str": "text", "SecretStr": "text (secret)", "bool": "boolean",
            "int": "integer", "float": "number"}.get(name, name)


def _cell(text: str) -> str:
    """Text fit for a table cell: `<NAME>` outside code spans is shown, not taken for HTML."""
    parts = text.split("`")
    parts[::2] = [html.escape(part, quote=False) for part in parts[::2]]
    return "`".join(parts).replace("|", "\\|").replace("\n", " ")


def settings_markdown() -> str:
    """The settings reference: every setting of the documented classes, grouped by the
    class that declares it, with its variable, type, default and description."""
    from pydantic_core import PydanticUndefined

    from outbox.settings_registry import OTHER_VARIABLES, documented_classes, settings_of
    from outbox.settings_report import default_of, mask, shown_value
    from outbox.settings_sources import FILE_SUFFIX, is_table

    settings = settings_of(documented_classes())
    groups: dict[type, list[Any]] = {}
    for s in settings.values():
        groups.setdefault(s.owner, []).append(s)
    lines = [
        "# Settings",
        "",
        "Every setting, generated from the settings classes when the site is built (the core's "
        "and those registered in the entry-point group `outbox.settings`), so the list cannot "
        "drift from the code. How they are read (environment, `<VARIABLE>_FILE` for secrets, "
        "the TOML file, defaults) is in [Configuration](../operating/configuration.md). In "
        "the configuration file a setting's key is its name in lower case without the "
        "`OUTBOX_` prefix (`database_url` for `OUTBOX_DATABASE_URL`).",
        "",
        f"{len(settings)} settings in {len(groups)} groups.",
        "",
    ]
    for owner, members in groups.items():
        title = SECTION_TITLES.get(owner.__name__, owner.__name__)
        doc = " ".join((owner.__doc__ or "").split())
        lines += [f"## {title}", "", f"`{owner.__module__}.{owner.__name__}`: {doc}", "",
                  "| variable | type | default | description |",
                  "|---|---|---|---|"]
        for s in members:
            default = default_of(s)
            if default is PydanticUndefined:
                shown = "**required**"
            elif default is None:
                shown = "unset"
            else:
                shown = f"`{shown_value(mask(default, s.secret))}`"
            description = s.field.description or ""
            if s.secret:
                description += f" (secret: or `{s.variable}{FILE_SUFFIX}`, a file holding it)"
            if is_table(s.field) and "__" not in description:
                description += f" (also `{s.variable}__<KEY>` variables, one per key)"
            if s.variable.lower() != f"outbox_{s.name}":
                description += f" (configuration file key `{s.name}`)"
            others = ", ".join(f"`{v}`" for v in s.variables[1:])
            if others:
                description += f" (also read from {others})"
            lines.append(f'| <span id="{s.variable.lower()}"></span>`{s.variable}` | '
                         f"{_cell(_type_name(s.field.annotation))} | "
                         f"{_cell(shown)} | {_cell(description)} |")
        lines.append("")
    lines += ["## Variables that are not settings", "",
              "`OUTBOX_*` variables that no process reads as a setting, known so that the "
              "check of unknown variables accepts them:", "",
              "| variable | what it is |", "|---|---|"]
    lines += [f"| `{name}` | {_cell(why)} |" for name, why in OTHER_VARIABLES.items()]
    return "\n".join(lines) + "\n"


def on_files(files: Files, config: MkDocsConfig) -> Files:
    """Add the generated reference pages to the site."""
    files.append(File.generated(config, CLI_PAGE, content=cli_markdown()))
    files.append(File.generated(config, SETTINGS_PAGE, content=settings_markdown()))
    return files
