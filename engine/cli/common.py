"""What every ``python -m engine`` command shares: config flags generated from the config's
field declarations, argument errors, output formatting, progress on stderr, and where
results go (``--out``/``--db``, checked before anything runs).

Nothing here imports torch: parsing arguments and printing stored results start fast.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from typing import Callable, TextIO

from ..config import (CONFIG_FIELDS, GIB, SCALAR_FIELDS, BenchConfig, ConfigError, parse_override,
                      parse_override_values)
from ..progress import Progress
from ..results import Result, read_results, write_jsonl
from ..store import Store, StoreError, is_url

MIB = 1024**2


class CLIError(Exception):
    """Bad command-line input that is not a config field (e.g. nothing to run)."""


class OutputError(Exception):
    """A result could not be saved to --out or --db after it was measured (e.g. the disk
    filled up). The result was printed on stderr as JSON; the command stops with exit code 1."""


class Parser(argparse.ArgumentParser):
    """argparse, but an error is one line on stderr (no usage block) and exit code 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


# ------------------------------------------------------------------------- config flags
def add_config_flags(parser: argparse.ArgumentParser, lists: bool = False) -> None:
    """One flag per BenchConfig field (``--set KEY=VALUE`` for the model dimensions); with
    ``lists``, each takes a comma list (a sweep)."""
    suffix = " (comma list)" if lists else ""
    for field in CONFIG_FIELDS:
        if field.kind is dict:
            example = "seq_len=128,256" if lists else "seq_len=256"
            parser.add_argument(field.flag, dest=field.name, action="append", default=[], metavar="KEY=VALUE",
                                help=f"model dimension override, e.g. {example} (repeatable)")
            continue
        parser.add_argument(field.flag, dest=field.name, metavar="VALUES" if lists else "VALUE",
                            help=f"{field.spec.help}: {field.allowed()} (default {field.format(field.default)}){suffix}")


def _split_override(item: str) -> tuple[str, str]:
    key, sep, value = item.partition("=")
    if not sep or not key.strip() or not value.strip():
        raise ConfigError("--set", item, "KEY=VALUE, e.g. seq_len=256")
    return key.strip(), value


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    """The BenchConfig for flags added by ``add_config_flags`` (unset flags keep defaults).

    Raises ConfigError naming the field for any bad value.
    """
    fields = {}
    for field in SCALAR_FIELDS:
        text = getattr(args, field.name, None)
        if text is not None:
            fields[field.name] = field.parse(text)
    overrides = {}
    for item in getattr(args, "overrides", None) or []:
        key, value = _split_override(item)
        if "," in value:
            raise ConfigError(f"overrides.{key}", value, "one integer here; a comma list is a sweep: "
                                                         f"python -m engine sweep --set {key}={value.strip()}")
        overrides[key] = parse_override(key, value)
    if overrides:
        fields["overrides"] = overrides
    return BenchConfig(**fields)


def grid_from_args(args: argparse.Namespace) -> tuple[dict, dict[str, list]]:
    """(base, grid) for ``sweep.expand`` from list flags: one value -> base, several -> grid
    (a model dimension's list under its axis, ``sweep.dimension_axis``)."""
    from ..sweep import axis_dimension, dimension_axis

    base: dict = {}
    grid: dict[str, list] = {}

    def put(name: str, values: list) -> None:
        if len(values) == 1:
            if (dimension := axis_dimension(name)) is not None:
                base.setdefault("overrides", {})[dimension] = values[0]
            else:
                base[name] = values[0]
        else:
            grid[name] = values

    for field in SCALAR_FIELDS:
        text = getattr(args, field.name, None)
        if text is not None:
            put(field.name, [field.parse(part) for part in text.split(",")])
    seen = set()
    for item in args.overrides:
        key, value = _split_override(item)
        if key in seen:  # the second would silently replace the first
            raise ConfigError("--set", item, f"each key once; give {key}'s values as one comma list")
        seen.add(key)
        put(dimension_axis(key), parse_override_values(key, value))
    return base, grid


def add_output_flags(parser: argparse.ArgumentParser, json_help: str = "print each result as JSON on stdout") -> None:
    """--out, --db and --json."""
    parser.add_argument("--out", metavar="FILE", help="append the runs made to this JSON Lines file")
    parser.add_argument("--db", metavar="PATH", help="store the runs made in this database (SQLite file or "
                        "postgresql:// URL)")
    parser.add_argument("--json", action="store_true", help=json_help)


# ------------------------------------------------------------------------- values
def number_list(text: str, name: str, kind=float) -> list:
    """A comma list of numbers > 0; CLIError naming the flag otherwise."""
    try:
        values = [kind(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise CLIError(f"{name}: {text!r} is not a comma list of numbers") from None
    if not values or any(not v > 0 or v == float("inf") for v in values):
        raise CLIError(f"{name}: {text!r} needs one or more finite values > 0")
    return values


def margin(value: float) -> float:
    """A memory margin: a fraction in [0, 1)."""
    if not 0 <= value < 1:
        raise CLIError(f"--margin: {value!r} must be a fraction in [0, 1), e.g. 0.05")
    return value


def load_results(args: argparse.Namespace) -> list[Result]:
    """Results from every --results file and the --db database (newest first); what the
    readers skipped (a torn last line) is a warning on stderr."""
    results = []
    if args.db is not None:
        results.extend(open_store(args.db).list())
    for path in getattr(args, "results", None) or []:
        found = read_results(path)
        warn_notes(found.notes)
        results.extend(sorted(found, key=lambda r: r.created_at, reverse=True))
    return results


def warn_notes(notes) -> None:
    """Each note of a reader (e.g. a skipped torn line) as a warning line on stderr."""
    for note in notes:
        print(f"warning: {note}", file=sys.stderr)


# ------------------------------------------------------------------------- output
def fmt_bytes(value) -> str:
    """Bytes as "1.25 GiB" / "12.0 MiB", "-" when unknown."""
    if value is None:
        return "-"
    return f"{value / GIB:,.2f} GiB" if value >= GIB else f"{value / MIB:,.1f} MiB"


def fmt_pct(value) -> str:
    """A signed fraction as a percentage, "-" when unknown."""
    return "-" if value is None else f"{value:+.1%}"


def table(header: tuple, rows: list[tuple]) -> str:
    """A plain-text table with a rule under the header, for terminals and logs."""
    cells = [tuple(str(c) for c in row) for row in (header, *rows)]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _ms(summary) -> str:
    return f"{summary.median:.1f}" if summary else "-"


def _dims(config: BenchConfig) -> str:
    """The model dimensions a run overrides, without spaces ("n_layers=2,seq_len=32"): rows of
    a sweep over one differ only there."""
    return ",".join(f"{k}={v}" for k, v in sorted(config.overrides.items())) or "-"


def _short_config(config: BenchConfig) -> str:
    ckpt = f"every-{config.k}" if config.ckpt == "every-k" else config.ckpt
    dims = f" {_dims(config)}" if config.overrides else ""
    ranks = f" {config.parallel}x{config.nproc}" if config.distributed else ""
    return " ".join([f"{config.model}{dims} b{config.batch}x{config.accum}{ranks} {config.precision} ckpt={ckpt}",
                     *config.settings_words()])


def result_line(result: Result) -> str:
    """One line about a result: the config, then the headline numbers or the error, then
    its warnings (noise, skipped steps) on the following lines."""
    head = f"{result.status:<9} {_short_config(result.config)}"
    if not result.ok:
        return f"{head}: {result.error}"
    m = result.metrics
    rate = f"{m.samples_per_s:.1f} samples/s" if m.samples_per_s is not None else "-"
    compiled = f", compiled in {m.compile_s:.1f} s (not in step time)" if m.compile_s is not None else ""
    return f"{head}: {_ms(m.step_ms)} ms/step, {rate}, peak {fmt_bytes(m.peak_allocated_bytes)}{compiled}"


def _noise(summary) -> str:
    """The step time's spread between steps (IQR/median), flagged "noisy" past 10 %."""
    if not summary:
        return "-"
    return f"±{summary.iqr_rel:.0%}" + (" noisy" if summary.noisy else "")


def format_table(results: list[Result]) -> str:
    """A plain-text table of results (one row each), noisy runs marked."""
    rows = []
    for r in results:
        c, m = r.config, r.metrics
        error = r.error or ""
        rows.append((
            r.id[:8], r.status, c.model, c.batch, c.accum, m.effective_batch, c.precision, c.ckpt, _dims(c),
            ", ".join(c.settings_words()) or "-",
            _ms(m.step_ms), _noise(m.step_ms), _ms(m.forward_ms), _ms(m.backward_ms), _ms(m.optimizer_ms),
            "-" if m.samples_per_s is None else f"{m.samples_per_s:.1f}", fmt_bytes(m.peak_allocated_bytes),
            "-" if m.compile_s is None else f"{m.compile_s:.1f}",
            error if len(error) <= 60 else error[:57] + "...",
        ))
    return table(("id", "status", "model", "batch", "accum", "eff", "precision", "ckpt", "dims", "settings", "step ms",
                  "spread", "fwd ms", "bwd ms", "opt ms", "samples/s", "peak alloc", "compile s", "error"), rows)


def one_line(text: str) -> str:
    """``text`` on one line, e.g. a message quoting a user model's multi-line error."""
    return " ".join(text.split())


def emit_json(obj) -> None:
    """An answer as indented JSON on stdout."""
    print(json.dumps(obj, allow_nan=False, indent=2))


class ProgressPrinter:
    """Progress events on stderr: one rewritten line on a terminal, a line per phase otherwise."""

    def __init__(self, stream: TextIO | None = None):
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.last = None

    def __call__(self, event: Progress) -> None:
        key = (event.index, event.trial, event.phase)
        if self.tty:
            self.stream.write(f"\r\033[K{event.describe()}")
            self.stream.flush()
        elif key != self.last:
            self.stream.write(f"{event.within(step=0, total=0).describe()}\n")
        self.last = key

    def line(self, text: str) -> None:
        """A permanent line (clears a rewritten progress line first)."""
        self.stream.write(("\r\033[K" if self.tty else "") + text + "\n")
        self.stream.flush()
        self.last = None


# ------------------------------------------------------------------------- where results go
def open_store(path: str, write: bool = False) -> Store:
    """The database at ``--db path``: a SQLite file or a ``postgresql://`` URL. For reading a
    file must exist; for writing (``write``) it is created if missing and must take a write
    now: not damaged (SQLite's quick_check), writable, with space on its disk (a server is
    asked to accept a write). CLIError/StoreError naming the database (never a password)
    otherwise, before anything is measured."""
    if not path:
        raise CLIError("--db: the path is empty; give a database file, e.g. --db data/runs.sqlite")
    if not is_url(path):
        if os.path.isdir(path):
            raise CLIError(f"--db: {path} is a directory, not a database file")
        if not write and not os.path.exists(path):
            raise CLIError(f"--db: {path}: no such database")
    store = Store(path)
    if write:
        store.check_writable()
        if not is_url(path):
            _check_space("--db", path)
    return store


def check_out_file(path: str) -> str:
    """``path`` if results can be appended to it now: not a directory, opens for appending
    (creating it and its directory), takes a write, and its disk has space. CLIError naming
    the file and why otherwise: checked before anything runs, so a bad --out loses no run."""
    if not path:
        raise CLIError("--out: the path is empty; give a file, e.g. --out runs.jsonl")
    if os.path.isdir(path):
        raise CLIError(f"--out: {path} is a directory, not a file")
    existed = os.path.exists(path)
    try:
        parent = os.path.dirname(path)
        if parent:
            os.makedirs(parent, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            # An empty write reaches the file's own write handler: files that open but
            # refuse writes (e.g. /proc/version) fail here instead of after the run.
            os.write(fd, b"")
        finally:
            os.close(fd)
        _check_space("--out", path)
    except (OSError, CLIError) as exc:
        if not existed:
            with contextlib.suppress(OSError):
                os.unlink(path)  # leave nothing behind for a run that never started
        if isinstance(exc, CLIError):
            raise
        raise CLIError(f"--out: {path}: cannot write there ({exc.strerror or exc})") from None
    return path


def _check_space(flag: str, path: str) -> None:
    stats = os.statvfs(os.path.dirname(os.path.abspath(path)))
    if stats.f_bavail == 0 and stats.f_blocks > 0:  # pseudo file systems report 0 blocks in all
        raise CLIError(f"{flag}: {path}: no space left on its disk")


def result_sinks(args: argparse.Namespace, printer: ProgressPrinter, print_json: bool) -> Callable[[Result], None]:
    """What happens to each result as it arrives: --out, --db, JSON on stdout (when
    ``print_json``), and a line on stderr.

    --out and --db are checked now, so a bad path fails before anything runs. If saving
    still fails later (the disk filled up), the result is printed on stderr as one JSON
    line, so it is not lost, and OutputError (exit code 1) stops the command, naming the
    file and why. A result is saved to every sink that works before that happens.
    """
    out = check_out_file(args.out) if args.out is not None else None
    store = open_store(args.db, write=True) if args.db is not None else None

    def on_result(result: Result) -> None:
        failures = []
        if out is not None:
            try:
                note = write_jsonl(out, [result], append=True)
            except OSError as exc:
                failures.append(f"{out}: {exc.strerror or exc}")
            else:
                if note:
                    printer.line(f"warning: {note}")
        if store is not None:
            try:
                store.add(result)
            except StoreError as exc:
                failures.append(str(exc))
        if print_json:
            print(result.to_json(), flush=True)
        printer.line(result_line(result))
        for warning in result.warnings:
            printer.line(f"  warning: {warning}")
        if failures:
            printer.line(result.to_json())
            raise OutputError(f"could not save the result ({'; '.join(failures)}); it is the JSON line above "
                              "on stderr; stopped")

    return on_result
