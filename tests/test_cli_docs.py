"""The command-line reference of the documentation site is generated from the parsers: every
command and subcommand the core and the registered packages add is on it, with its options."""

from __future__ import annotations

import argparse

from outbox.cli import build_parser
from tests.test_settings_docs import load_hook


def _commands(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    found = [parser]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in dict.fromkeys(action.choices.values()):
                found += _commands(sub)
    return found


def test_the_cli_reference_has_every_command_and_option() -> None:
    page = load_hook().cli_markdown()
    commands = _commands(build_parser())
    assert len(commands) > 10  # the core's and the registered packages' commands
    for parser in commands:
        assert f"`{parser.prog}`" in page, parser.prog
        for action in parser._actions:
            for option in action.option_strings:
                assert option in page, f"{parser.prog} {option}"
