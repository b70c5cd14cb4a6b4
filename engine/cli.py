"""Command line: ``python -m engine run | sweep | devices | show FILE``.

A thin front end over the same engine calls the dashboard uses. Bad input (arguments,
config values, results files, database paths) ends with one line on stderr and exit code
2, never a traceback. Subcommands register a handler with ``set_defaults(func=handler)``;
``handler(args) -> int`` returns the exit code. ``engine.cli_decisions.register(subparsers)``
adds the decision commands when that module exists.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from typing import Callable, TextIO

from .config import GIB, BenchConfig, ConfigError
from .devices import cpu_name, default_device, list_gpus, nvml_message
from .results import ResultFormatError, read_results, write_jsonl
from .store import Store, StoreError
from .sweep import expand, run_sweep
from .worker import run_isolated

MIB = 1024**2

# (flag, field, converter, help) for every BenchConfig field a flag sets; --set is separate.
_FLAGS: tuple[tuple[str, str, Callable[[str], object], str], ...] = (
    ("--model", "model", str, "preset (gpt-tiny, gpt-small, ..., mlp, cnn) or module:function"),
    ("--batch", "batch", int, "micro-batch size (>= 1)"),
    ("--accum", "accum", int, "gradient-accumulation steps (>= 1)"),
    ("--precision", "precision", str, "fp32, fp16 or bf16"),
    ("--ckpt", "ckpt", str, "activation checkpointing: none, full, every-k, selective"),
    ("--k", "k", int, "for --ckpt every-k: checkpoint every k-th block"),
    ("--optimizer", "optimizer", str, "adamw or sgd"),
    ("--warmup", "warmup", int, "warm-up optimizer steps (not measured)"),
    ("--steps", "steps", int, "measured optimizer steps"),
    ("--device", "device", str, "auto, cpu, cuda, cuda:N, mps"),
    ("--memory-cap-gib", "memory_cap_gib", float, "cap memory to emulate a smaller device (GiB)"),
    ("--timeout", "timeout_s", float, "wall-clock limit for the run (seconds)"),
    ("--seed", "seed", int, "random seed"),
)
_KIND = {int: "an integer", float: "a number", str: "a value"}


class CLIError(Exception):
    """Bad command-line input that is not a config field (e.g. nothing to run)."""


class _Parser(argparse.ArgumentParser):
    """argparse, but an error is one line on stderr (no usage block) and exit code 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


# ------------------------------------------------------------------------- config flags
def add_config_flags(parser: argparse.ArgumentParser, lists: bool = False) -> None:
    """Add the BenchConfig flags of ARCHITECTURE.md; with ``lists``, each takes a comma list."""
    suffix = " (comma list)" if lists else ""
    for flag, field, _, help_text in _FLAGS:
        parser.add_argument(flag, dest=field, metavar="VALUES" if lists else "VALUE", help=help_text + suffix)
    example = "seq_len=128,256" if lists else "seq_len=256"
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help=f"model dimension override, e.g. {example} (repeatable)")


def _convert(field: str, text: str, converter: Callable[[str], object]):
    if field == "memory_cap_gib" and text.strip().lower() == "none":
        return None
    try:
        return converter(text.strip())
    except ValueError:
        raise ConfigError(field, text, _KIND[converter]) from None


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
    for _, field, converter, _ in _FLAGS:
        text = getattr(args, field, None)
        if text is not None:
            fields[field] = _convert(field, text, converter)
    overrides = {}
    for item in getattr(args, "overrides", None) or []:
        key, value = _split_override(item)
        overrides[key] = _convert(f"overrides.{key}", value, int)
    if overrides:
        fields["overrides"] = overrides
    return BenchConfig(**fields)


def grid_from_args(args: argparse.Namespace) -> tuple[dict, dict[str, list]]:
    """(base, grid) for ``sweep.expand`` from list flags: one value -> base, several -> grid."""
    base: dict = {}
    grid: dict[str, list] = {}

    def put(name: str, values: list) -> None:
        if len(values) == 1:
            if name.startswith("overrides."):
                base.setdefault("overrides", {})[name.split(".", 1)[1]] = values[0]
            else:
                base[name] = values[0]
        else:
            grid[name] = values

    for _, field, converter, _ in _FLAGS:
        text = getattr(args, field, None)
        if text is not None:
            put(field, [_convert(field, part, converter) for part in text.split(",")])
    for item in args.overrides:
        key, value = _split_override(item)
        put(f"overrides.{key}", [_convert(f"overrides.{key}", part, int) for part in value.split(",")])
    return base, grid


# ------------------------------------------------------------------------- output
def _ms(summary: dict | None) -> str:
    return f"{summary['median']:.1f}" if summary else "-"


def _bytes(value) -> str:
    if value is None:
        return "-"
    return f"{value / GIB:.2f} GiB" if value >= GIB else f"{value / MIB:.1f} MiB"


def _describe(config: dict) -> str:
    ckpt = config.get("ckpt")
    if ckpt == "every-k":
        ckpt = f"every-{config.get('k')}"
    return f"{config.get('model')} b{config.get('batch')}x{config.get('accum')} {config.get('precision')} ckpt={ckpt}"


def result_line(result: dict) -> str:
    """One line about a result: the config, then the headline numbers or the error."""
    m = result["metrics"]
    head = f"{result['status']:<9} {_describe(result['config'])}"
    if result["status"] != "ok":
        return f"{head}: {result['error']}"
    rate = f"{m['samples_per_s']:.1f} samples/s" if m.get("samples_per_s") is not None else "-"
    return f"{head}: {_ms(m['step_ms'])} ms/step, {rate}, peak {_bytes(m.get('peak_allocated_bytes'))}"


def format_table(results: list[dict]) -> str:
    """A plain-text table of results (one row each), for terminals and logs."""
    header = ("id", "status", "model", "batch", "accum", "eff", "precision", "ckpt",
              "step ms", "fwd ms", "bwd ms", "samples/s", "peak alloc", "error")
    rows = []
    for r in results:
        c, m = r["config"], r["metrics"]
        rate = m.get("samples_per_s")
        error = r.get("error") or ""
        rows.append((
            r["id"][:8], r["status"], str(c.get("model")), str(c.get("batch")), str(c.get("accum")),
            str(m.get("effective_batch")), str(c.get("precision")), str(c.get("ckpt")),
            _ms(m.get("step_ms")), _ms(m.get("forward_ms")), _ms(m.get("backward_ms")),
            f"{rate:.1f}" if rate is not None else "-", _bytes(m.get("peak_allocated_bytes")),
            error if len(error) <= 60 else error[:57] + "...",
        ))
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in (header, *rows)]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


class _Progress:
    """Progress events on stderr: one rewritten line on a terminal, phase changes otherwise."""

    def __init__(self, stream: TextIO):
        self.stream = stream
        self.tty = stream.isatty()
        self.last = None

    def __call__(self, event: dict) -> None:
        prefix = f"[{event['index']}/{event['count']}] " if "index" in event else ""
        phase = event.get("phase", "")
        if phase == "queued":
            text = f"waiting for the device (position {event.get('position')})"
        elif "step" in event and "total" in event:
            text = f"{phase} {event['step']}/{event['total']}"
        else:
            text = str(phase)
        if self.tty:
            self.stream.write(f"\r\033[K{prefix}{text}")
            self.stream.flush()
        elif (event.get("index"), phase) != self.last:
            self.stream.write(f"{prefix}{phase}\n")
        self.last = (event.get("index"), phase)

    def line(self, text: str) -> None:
        """A permanent line (clears a rewritten progress line first)."""
        self.stream.write(("\r\033[K" if self.tty else "") + text + "\n")
        self.stream.flush()
        self.last = None


# ------------------------------------------------------------------------- commands
def _result_sinks(args: argparse.Namespace, progress: _Progress) -> Callable[[dict], None]:
    """What happens to each result as it arrives: --out, --db, --json, and a line on stderr."""
    store = Store(args.db) if args.db else None  # opened now so a bad --db fails before running

    def on_result(result: dict) -> None:
        if args.out:
            write_jsonl(args.out, [result], append=True)
        if store is not None:
            store.add(result)
        if args.json:
            print(json.dumps(result, allow_nan=False), flush=True)
        progress.line(result_line(result))

    return on_result


def _cmd_run(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    progress = _Progress(sys.stderr)
    on_result = _result_sinks(args, progress)
    result = run_isolated(config, progress)
    on_result(result)
    if not args.json:
        print(format_table([result]))
    return 0 if result["status"] == "ok" else 1


def _cmd_sweep(args: argparse.Namespace) -> int:
    if args.effective_batch is not None:
        args.effective_batch = _convert("effective_batch", args.effective_batch, int)
    base, grid = grid_from_args(args)
    configs, notes = expand(base, grid, args.effective_batch)
    if not configs:
        raise CLIError("nothing to run: " + "; ".join(notes or ["no configurations"]))
    progress = _Progress(sys.stderr)
    for note in notes:
        progress.line(f"note: {note}")
    on_result = _result_sinks(args, progress)
    results = run_sweep(configs, progress, on_result)
    if not args.json:
        print(format_table(results))
    return 0


def _cmd_devices(args: argparse.Namespace) -> int:
    gpus = list_gpus()
    for gpu in gpus:
        used, total = _bytes(gpu["memory_used_bytes"]), _bytes(gpu["memory_total_bytes"])
        util = f"{gpu['utilization_pct']}%" if gpu["utilization_pct"] is not None else "-"
        print(f"GPU {gpu['index']}  {gpu['name']}  memory {used} / {total}  utilisation {util}  "
              f"driver {gpu['driver'] or '-'}  CUDA {gpu['cuda'] or '-'}")
    if not gpus:
        print(nvml_message() or "No NVIDIA GPU found")
    device = default_device()
    detail = f" ({cpu_name()})" if device == "cpu" else ""
    print(f"Benchmarks with --device auto run on: {device}{detail}")
    return 0


def _cmd_show(args: argparse.Namespace) -> int:
    results = read_results(args.file)
    print(format_table(results) if results else f"{args.file}: no results")
    return 0


def _add_output_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", metavar="FILE", help="append results to this JSON Lines file")
    parser.add_argument("--db", metavar="PATH", help="also store results in this SQLite database")
    parser.add_argument("--json", action="store_true", help="print each result as JSON on stdout")


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m engine`` parser with every subcommand (including cli_decisions')."""
    parser = _Parser(prog="python -m engine", description="Tradeoff Lab: benchmark PyTorch training steps.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = subparsers.add_parser("run", help="benchmark one configuration in a worker process",
                                description="Benchmark one configuration. Exit code 0 when the run is ok, 1 when it failed (oom, error, timeout).")
    add_config_flags(run)
    _add_output_flags(run)
    run.set_defaults(func=_cmd_run)

    sweep = subparsers.add_parser("sweep", help="benchmark every combination of comma-separated values",
                                  description="Benchmark the cross product of comma lists, e.g. --batch 1,2,4 --precision fp32,bf16. Continues past failures.")
    add_config_flags(sweep, lists=True)
    sweep.add_argument("--effective-batch", metavar="N", help="set accum = N / batch; skip batches that do not divide N")
    _add_output_flags(sweep)
    sweep.set_defaults(func=_cmd_sweep)

    devices = subparsers.add_parser("devices", help="list NVIDIA GPUs and the device --device auto uses")
    devices.set_defaults(func=_cmd_devices)

    show = subparsers.add_parser("show", help="print a results file (JSON Lines) as a table")
    show.add_argument("file", metavar="FILE")
    show.set_defaults(func=_cmd_show)

    if importlib.util.find_spec("engine.cli_decisions") is not None:
        from . import cli_decisions

        cli_decisions.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv``, run the command, return its exit code (2 for bad input, one stderr line)."""
    parser = build_parser()
    args = parser.parse_args(argv)
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

