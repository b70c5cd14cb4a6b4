"""The benchmark commands: ``run``, ``sweep``, ``devices`` and ``show``."""
from __future__ import annotations

import argparse

from ..config import BenchConfig, ConfigError, check_runnable
from ..results import SQLITE_MAGIC, decode_results
from .common import (CLIError, ProgressPrinter, add_config_flags, add_output_flags, config_from_args, emit_json,
                     fmt_bytes, format_table, grid_from_args, result_sinks, table, warn_notes)


def _checked_and_warming(configs: list, args: argparse.Namespace) -> None:
    """The pre-run checks of ``configs``, with the memory check (which loads torch and builds
    each model on the meta device, seconds) overlapping the worker's own start-up."""
    from ..limits import check_memory
    from ..worker import shared_worker

    for config in configs:
        check_runnable(config, check_memory=False)
    if args.force:
        return
    shared_worker(configs[0].device).start()
    for config in configs:
        check_memory(config)


def _cmd_run(args: argparse.Namespace) -> int:
    from ..worker import run

    config = config_from_args(args)
    printer = ProgressPrinter()
    on_result = result_sinks(args, printer, print_json=args.json)  # checks --out/--db before anything starts
    _checked_and_warming([config], args)
    result = run(config, printer)
    on_result(result)
    if not args.json:
        print(format_table([result]))
    return 0 if result.ok else 1


def _cmd_sweep(args: argparse.Namespace) -> int:
    from ..sweep import accumulation_notes, expand, run_sweep

    effective = None
    if args.effective_batch is not None:
        if not args.effective_batch.strip().isdigit():
            raise ConfigError("effective_batch", args.effective_batch, "an integer >= 1")
        effective = int(args.effective_batch)
    base, grid = grid_from_args(args)
    configs, notes = expand(base, grid, effective)
    if not configs:
        raise CLIError("nothing to run: " + "; ".join(notes or ["no configurations"]))
    printer = ProgressPrinter()
    on_result = result_sinks(args, printer, print_json=args.json)
    _checked_and_warming(configs, args)
    for note in notes + accumulation_notes(configs):
        printer.line(f"note: {note}")
    results = run_sweep(configs, printer, on_result)
    if not args.json:
        print(format_table(results))
    return 0


def _cmd_devices(args: argparse.Namespace) -> int:
    from .. import nvml
    from ..devices import cpu_model_name, gpu_label, gpus, resolve_device

    found = gpus()
    for gpu in found:
        used, total = fmt_bytes(gpu["memory_used_bytes"]), fmt_bytes(gpu["memory_total_bytes"])
        util = f"{gpu['utilization_pct']}%" if gpu["utilization_pct"] is not None else "-"
        print(f"GPU {gpu_label(gpu)}  {gpu['name']}  {gpu['uuid'] or '-'}  memory {used} / {total}  utilisation {util}  "
              f"driver {gpu['driver'] or '-'}  CUDA {gpu['cuda'] or '-'}")
    if not found:
        print(nvml.unavailable_reason() or "No NVIDIA GPU found")
    device = resolve_device("auto")
    detail = f" ({cpu_model_name()})" if device == "cpu" else ""
    print(f"Benchmarks with --device auto run on: {device}{detail}")
    return 0


def _cmd_selfcheck(args: argparse.Namespace) -> int:
    from ..config import FIELDS_BY_NAME
    from ..selfcheck import run_selfcheck

    device = FIELDS_BY_NAME["device"].parse(args.device)
    check_runnable(BenchConfig(device=device, warmup=2))
    checks = run_selfcheck(device, None if args.json else ProgressPrinter())
    if args.json:
        emit_json({"checks": [check.to_dict() for check in checks]})
    else:
        print(table(("check", "expected", "measured", "result"),
                    [(c.name, c.expected, c.measured, c.status + (f" ({c.reason})" if c.reason else "")) for c in checks]))
        print(", ".join(f"{sum(c.status == status for c in checks)} {status}ed" if status != "skip" else
                        f"{sum(c.status == 'skip' for c in checks)} skipped" for status in ("pass", "fail", "skip")))
    return 1 if any(c.status == "fail" for c in checks) else 0


def _cmd_show(args: argparse.Namespace) -> int:
    with open(args.file, "rb") as f:
        data = f.read()
    if data.startswith(SQLITE_MAGIC):
        raise CLIError(f"{args.file} is a SQLite database of runs, not a results file; "
                       f"list it with: python -m engine list --db {args.file}")
    results = decode_results(data, args.file)
    warn_notes(results.notes)
    print(format_table(results) if results else f"{args.file}: no results")
    return 0


def _force_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--force", action="store_true",
                        help="run even when the analytic memory estimate is several times the device's memory")


def register(subparsers) -> None:
    """Add run, sweep, devices and show to ``python -m engine``."""
    run = subparsers.add_parser("run", help="benchmark one configuration in a worker process",
                                description="Benchmark one configuration. Exit code 0 when the run is ok, 1 when it failed (oom, error, timeout).")
    add_config_flags(run)
    add_output_flags(run)
    _force_flag(run)
    run.set_defaults(func=_cmd_run)

    sweep = subparsers.add_parser("sweep", help="benchmark every combination of comma-separated values",
                                  description="Benchmark the cross product of comma lists, e.g. --batch 1,2,4 --precision fp32,bf16. Continues past failures.")
    add_config_flags(sweep, lists=True)
    sweep.add_argument("--effective-batch", metavar="N", help="set accum = N / batch; skip batches that do not divide N")
    add_output_flags(sweep)
    _force_flag(sweep)
    sweep.set_defaults(func=_cmd_sweep)

    devices = subparsers.add_parser("devices", help="list NVIDIA GPUs and the device --device auto uses")
    devices.set_defaults(func=_cmd_devices)

    selfcheck = subparsers.add_parser(
        "selfcheck", help="check the tool's own measurements on this hardware (run this first on a new GPU machine)",
        description="Timing attribution, the timing illusion, peak memory against an independent count, the memory "
                    "cap, no host synchronisation in a timed step, warm vs fresh worker, gradient equivalence and the "
                    "peak-FLOPs table, each as pass/fail/skip. Exit code 1 when a check fails.")
    selfcheck.add_argument("--device", default="auto", help="device to check: auto, cpu, cuda, cuda:N, mps (default auto)")
    selfcheck.add_argument("--json", action="store_true",
                           help='print {"checks": [{"name", "status", "expected", "measured", "reason"}]}')
    selfcheck.set_defaults(func=_cmd_selfcheck)

    show = subparsers.add_parser("show", help="print a results file (JSON Lines) as a table (a database: use list)")
    show.add_argument("file", metavar="FILE")
    show.set_defaults(func=_cmd_show)
