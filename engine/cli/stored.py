"""The commands over a database of stored runs: ``list`` and ``import``."""
from __future__ import annotations

import argparse
import sys

from ..store import DEFAULT_PATH, ImportOutcome, default_path, import_bundle
from .common import format_table, one_line, open_store


def _cmd_list(args: argparse.Namespace) -> int:
    store = open_store(default_path() if args.db is None else args.db)
    results, unreadable = store.list(), store.unreadable()
    print(format_table(results) if results else f"{store.path}: no stored runs")
    if unreadable:
        first_id, problem = unreadable[0]
        print(one_line(f"warning: {len(unreadable)} stored row(s) cannot be read (written by another version, or "
                        f"damaged), e.g. {first_id[:8]}: {problem}"), file=sys.stderr)
    return 0


def _cmd_import(args: argparse.Namespace) -> int:
    store = open_store(default_path() if args.db is None else args.db, write=True)
    rejected = 0
    for path in args.files:
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as exc:
            outcome = ImportOutcome(path, error=f"{path}: {exc.strerror or exc}")
        else:
            outcome = import_bundle(store, path, data)
        if outcome.ok:
            print(one_line(outcome.message()))
        else:
            rejected += 1
            print("error: " + one_line(outcome.message()), file=sys.stderr)
    return 2 if rejected else 0


def register(subparsers) -> None:
    """Add list and import to ``python -m engine``."""
    # The default is read when the command runs, and --help never prints $TRADEOFF_LAB_DB: it
    # may be a URL with a password in it.
    db_help = f"database of runs: SQLite file or postgresql:// URL (default $TRADEOFF_LAB_DB, else {DEFAULT_PATH})"
    p = subparsers.add_parser("list", help="print the runs stored in a database as a table")
    p.add_argument("--db", metavar="PATH", help=db_help)
    p.set_defaults(func=_cmd_list)

    p = subparsers.add_parser(
        "import", help="add results files (JSON Lines bundles) to a database, validated",
        description="Each file is validated whole first, exactly as the dashboard's import: a bad file imports "
                    "nothing. Prints what each file added and skipped. Exit code 2 when a file was rejected.")
    p.add_argument("files", nargs="+", metavar="FILE")
    p.add_argument("--db", metavar="PATH", help=db_help)
    p.set_defaults(func=_cmd_import)
