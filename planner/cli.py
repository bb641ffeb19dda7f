"""The ``planner`` command line.

Each command group lives in its own module under ``planner/commands`` and exposes
``register(subparsers)``; adding a command is adding a file and a line in ``COMMAND_MODULES``.
User errors end in one line on stderr, ``planner: error: ...``, and exit status 2, whatever the command:
bad arguments, :class:`PlannerError`, OS errors (a file that cannot be read or written, named with its
reason), text that is not UTF-8, and running out of memory (:func:`user_error` is the one mapping).
Anything else is a bug and shows its traceback. ``planner --debug COMMAND`` shows the traceback of
user errors too. Every message and every text report is printed with control characters escaped, and an
error line that quotes a huge value keeps its start and its reason (:func:`error_line`).
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from typing import Any

import planner
from planner.errors import PlannerError
from planner.io import json_safe, os_reason, printable

# Options that name a file or folder: an empty one would silently fall back to a default (or to nothing).
PATH_OPTIONS = ("out", "png", "profile", "plan", "prompts", "eval_prompts", "storage")

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
        self.exit(2, error_line(message) + "\n")


def build_parser() -> argparse.ArgumentParser:
    """The full parser, with every command module that can be imported registered."""
    parser = _Parser(prog="planner", description="Profile a Diffusion Transformer, search a cache plan, apply it.")
    parser.add_argument("--version", action="version", version=f"planner {planner.__version__}")
    parser.add_argument("--debug", action="store_true", help="show the Python traceback of an error")
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
        print(printable(text))


def _json_default(obj):
    if hasattr(obj, "item"):
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    return str(obj)


def user_error(exc: BaseException) -> str | None:
    """The one-line message for an error caused by the user's input or environment, ``None`` for a bug.

    Library code raises :class:`PlannerError` where it knows the cause; this maps what can still
    escape from the edges: OS errors (named with their path and reason), undecodable text, memory."""
    if isinstance(exc, PlannerError):
        return str(exc)
    if isinstance(exc, OSError):
        reason = os_reason(exc)
        if exc.filename is not None and exc.filename2 is not None:
            return f"cannot move {exc.filename} to {exc.filename2}: {reason}"
        if exc.filename is not None:
            return f"{exc.filename}: {reason}"
        return f"{type(exc).__name__}: {reason}"
    if isinstance(exc, UnicodeDecodeError):
        return f"input is not UTF-8 text (bad byte at offset {exc.start})"
    if isinstance(exc, MemoryError):
        return "out of memory (an input asks for more than this machine has)"
    if isinstance(exc, RecursionError):
        return "input nested too deeply"
    return None


# An error quotes what it was given (an argument, a key from a file), which may be megabytes long: past this
# many characters the line keeps its start and its end (the reason) and leaves the middle out.
MAX_ERROR_CHARS = 600


def error_line(message: str) -> str:
    """``planner: error: MESSAGE`` on one line, control characters and line breaks escaped, at most about
    :data:`MAX_ERROR_CHARS` characters of the message (a longer one loses its middle, and says so)."""
    text = printable(message, keep_newlines=False)
    if len(text) > MAX_ERROR_CHARS:
        head, tail = MAX_ERROR_CHARS * 2 // 3, MAX_ERROR_CHARS // 3
        text = f"{text[:head]} [{len(text) - head - tail} characters left out] {text[-tail:]}"
    return f"planner: error: {text}"


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``planner`` console script; returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # bad arguments (one line already printed), --help, --version
        return exc.code if isinstance(exc.code, int) else 2
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    if empty := next((name for name in PATH_OPTIONS if getattr(args, name, None) == ""), None):
        print(error_line(f"--{empty.replace('_', '-')} needs a path, got an empty string"), file=sys.stderr)
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("planner: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        message = user_error(exc)
        if message is None or args.debug:
            raise
        print(error_line(message), file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
