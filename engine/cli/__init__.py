"""Command line: ``python -m engine COMMAND``.

A thin front end over the same engine calls the dashboard uses: ``bench`` holds run, sweep,
devices and show; ``decide`` the decision commands; ``common`` what they share. Bad input
(arguments, config values, results files, database paths) ends with one line on stderr
and exit code 2, never a traceback. Each subcommand registers ``handler(args) -> int``
with ``set_defaults(func=handler)``.
"""
from __future__ import annotations

import sys

from ..config import ConfigError
from ..results import ResultFormatError
from ..store import StoreError
from . import bench, decide
from .common import CLIError, Parser


def build_parser() -> Parser:
    """The ``python -m engine`` parser with every subcommand."""
    parser = Parser(prog="python -m engine", description="Tradeoff Lab: benchmark PyTorch training steps.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    bench.register(subparsers)
    decide.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv``, run the command, return its exit code (2 for bad input, one stderr line)."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, ResultFormatError, StoreError, CLIError) as exc:
        # One line even when the message quotes multi-line text (e.g. a user model's error).
        print("error: " + " ".join(str(exc).split()), file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: {exc.filename or ''}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
