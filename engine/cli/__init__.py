"""Command line: ``python -m engine COMMAND``.

A thin front end over the same engine calls the dashboard uses: ``bench`` holds run, sweep,
devices and show; ``stored`` list and import; ``decide`` the decision commands; ``common``
what they share. Bad input (arguments, config values, results files, database paths) ends
with one line on stderr and exit code 2, never a traceback. A result measured but not
saved (the disk filled up) is printed on stderr as JSON, with exit code 1. Each subcommand
registers ``handler(args) -> int`` with ``set_defaults(func=handler)``.
"""
from __future__ import annotations

import sys

from ..config import ConfigError
from ..results import ResultFormatError
from ..store import StoreError
from . import bench, decide, stored
from .common import CLIError, OutputError, Parser, one_line


def build_parser() -> Parser:
    """The ``python -m engine`` parser with every subcommand."""
    parser = Parser(prog="python -m engine", description="Tradeoff Lab: benchmark PyTorch training steps.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    bench.register(subparsers)
    stored.register(subparsers)
    decide.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv``, run the command, return its exit code: 2 for bad input, 1 for a result
    that could not be saved; either with one stderr line."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, ResultFormatError, StoreError, CLIError) as exc:
        print("error: " + one_line(str(exc)), file=sys.stderr)
        return 2
    except OutputError as exc:
        print("error: " + one_line(str(exc)), file=sys.stderr)
        return 1
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
