"""The ``planner`` command line.

Each command group lives in its own module under ``planner/commands`` and exposes
``register(subparsers)``; adding a command is adding a file and a line in ``COMMAND_MODULES``.
User errors (``PlannerError``, bad arguments) end in one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from typing import Any

import planner
from planner.errors import PlannerError
from planner.io import json_safe

COMMAND_MODULES = [
    "planner.commands.zoo",
    "planner.commands.sample",
    "planner.commands.profile",
    "planner.commands.plan",
    "planner.commands.search",
    "planner.commands.eval",
    "planner.commands.bench",
]


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error and exit status 2 (argparse's own usage dump is noise here)."""

    def error(self, message: str):
        self.exit(2, f"planner: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    """The full parser, with every command module that can be imported registered."""
    parser = _Parser(prog="planner", description="Profile a Diffusion Transformer, search a cache plan, apply it.")
    parser.add_argument("--version", action="version", version=f"planner {planner.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:  # a real import error inside an existing command module
                raise
            continue
        module.register(sub)
    return parser


def add_json_flag(parser: argparse.ArgumentParser) -> None:
    """Give a figure-reporting command its ``--json`` flag."""
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout instead of text")


def report(args: argparse.Namespace, payload: dict[str, Any], text: str) -> None:
    """Print ``payload`` as one JSON object when ``--json`` was given, else ``text``."""
    if getattr(args, "json", False):
        print(json.dumps(json_safe(payload), default=_json_default, allow_nan=False))
    else:
        print(text)


def _json_default(obj):
    if hasattr(obj, "item"):
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    return str(obj)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``planner`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except PlannerError as exc:
        print(f"planner: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("planner: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
