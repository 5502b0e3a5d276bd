"""`--help` of every command and subcommand: each flag says what it does and, where it has
one, its default."""
from __future__ import annotations

import argparse

import pytest

from pdserve.cli import COMMANDS, build_parser


def _parsers(parser: argparse.ArgumentParser, path: str):
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _parsers(sub, f"{path} {name}")


def _all_parsers():
    for command in COMMANDS:
        root = build_parser(command)
        for path, p in _parsers(root, "pdserve"):
            if path == "pdserve" and command != "generate":
                continue  # the root once is enough
            if path == "pdserve" or path.split()[1] == command:
                yield path, p


PARSERS = list(_all_parsers())


def test_every_command_and_subcommand_is_walked():
    paths = {path for path, _ in PARSERS}
    assert {f"pdserve {c}" for c in COMMANDS} | {"pdserve", "pdserve sim gen"} <= paths


@pytest.mark.parametrize("path,parser", PARSERS, ids=[p for p, _ in PARSERS])
def test_every_flag_has_help_and_its_default(path, parser):
    fmt = parser._get_formatter()
    missing, no_default = [], []
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
            continue
        name = "/".join(action.option_strings) or action.dest
        if not (action.help or "").strip():
            missing.append(name)
            continue
        shown = fmt._get_help_string(action) % {"default": action.default}
        d = action.default
        has_default = not (d is None or d is False or d is argparse.SUPPRESS or d == [])  # 0 is a default
        if has_default and "default" not in shown:
            no_default.append(name)
    assert not missing, f"{path}: flags without help: {missing}"
    assert not no_default, f"{path}: help that does not give the default: {no_default}"


def test_help_prints_defaults():
    text = build_parser("sim")._subparsers._group_actions[0].choices["sim"].format_help()
    assert "--log-interval LOG_INTERVAL" in text and "(default: 1.0)" in text
