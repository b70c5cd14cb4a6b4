"""The decision commands of ``python -m engine``: find-batch, predict, recommend, timeline, pitfall.

``engine/cli.py`` calls ``register(subparsers)``. The commands take the same config flags
as ``run`` (``cli.add_config_flags``), print a readable answer (or ``--json`` on stdout),
show progress on stderr, and raise ConfigError/CLIError for bad input, which cli.main turns
into one stderr line and exit code 2. Exit code 1 means the input was fine but the answer
is negative (nothing fits, the measurement failed).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from . import finder, frontier, predict
from .cli import CLIError, add_config_flags, config_from_args, result_line
from .config import FIELD_NAMES, GIB, device_capacity_bytes, resolve_device
from .isolated import IsolatedRunError
from .results import read_results, write_jsonl
from .store import Store
from .worker import run_isolated

MIB = 1024**2


# ------------------------------------------------------------------------- helpers
def _gib(value) -> str:
    return "-" if value is None else f"{value / GIB:,.2f} GiB" if value >= GIB else f"{value / MIB:,.1f} MiB"


def _pct(value) -> str:
    return "-" if value is None else f"{value:+.1%}"


def _table(header: tuple, rows: list[tuple]) -> str:
    cells = [tuple(str(c) for c in row) for row in (header, *rows)]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _number_list(text: str, name: str, kind=float) -> list:
    try:
        values = [kind(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise CLIError(f"{name}: {text!r} is not a comma list of numbers") from None
    if not values or any(v <= 0 for v in values):
        raise CLIError(f"{name}: {text!r} needs one or more values > 0")
    return values


def _margin(value: float) -> float:
    if not 0 <= value < 1:
        raise CLIError(f"--margin: {value!r} must be a fraction in [0, 1), e.g. 0.05")
    return value


def _progress_printer():
    """Progress events on stderr: one rewritten line on a terminal, phase changes otherwise."""
    stream = sys.stderr
    tty = stream.isatty()
    last = {"key": None}

    def show(event: dict) -> None:
        prefix = f"batch {event['batch']} (trial {event['trial']}): " if "trial" in event else ""
        phase = event.get("phase", "")
        detail = f" {event['step']}/{event['total']}" if "step" in event and "total" in event else ""
        if phase == "queued":
            detail = f": waiting for the device (position {event.get('position')})"
        if tty:
            stream.write(f"\r\033[K{prefix}{phase}{detail}")
            stream.flush()
        elif (prefix, phase) != last["key"]:
            stream.write(f"{prefix}{phase}\n")
        last["key"] = (prefix, phase)

    def line(text: str) -> None:
        stream.write(("\r\033[K" if tty else "") + text + "\n")
        stream.flush()

    show.line = line
    return show


def _sinks(args):
    """Store each new result in --out / --db as it arrives."""
    store = Store(args.db) if args.db else None

    def on_result(result: dict) -> None:
        if args.out:
            write_jsonl(args.out, [result], append=True)
        if store is not None:
            store.add(result)

    return on_result


def _load_results(args) -> list[dict]:
    """Results from every --results file and the --db database (newest first)."""
    results = []
    if args.db:
        if not os.path.exists(args.db):
            raise CLIError(f"--db: {args.db}: no such database")
        results.extend(Store(args.db).list())
    for path in args.results or []:
        results.extend(sorted(read_results(path), key=lambda r: r["created_at"], reverse=True))
    return results


def _emit_json(obj) -> None:
    print(json.dumps(obj, allow_nan=False, indent=2))


# ------------------------------------------------------------------------- find-batch
def _cmd_find_batch(args) -> int:
    config = config_from_args(args)
    margin = _margin(args.margin)
    if args.max_batch < 1:
        raise CLIError(f"--max-batch: {args.max_batch} must be >= 1")
    if args.time_limit is not None and not args.time_limit > 0:
        raise CLIError(f"--time-limit: {args.time_limit} must be > 0 seconds")
    show = _progress_printer()
    sink = _sinks(args)

    def on_result(result: dict) -> None:
        sink(result)
        show.line(result_line(result))

    report = finder.find_batch(
        config, max_batch=args.max_batch, margin=margin, time_limit_s=args.time_limit,
        progress=show, on_result=on_result,
    )
    if args.json:
        _emit_json(report)
    else:
        rows = [(t["batch"], t["status"], "yes" if t["fits"] else "no", _gib(t["peak_allocated_bytes"]),
                 "-" if t["samples_per_s"] is None else f"{t['samples_per_s']:,.1f}") for t in report["trials"]]
        print(_table(("batch", "status", "fits", "peak alloc", "samples/s"), rows))
        budget = f"{_gib(report['budget_bytes'])} ({1 - margin:.0%} of {_gib(report['capacity_bytes'])})"
        if report["max_batch"] is None:
            print(f"No micro-batch fits within {budget}.")
        else:
            bound = "" if report["exact"] else " (at least; the search stopped before pinning it down)"
            print(f"Largest micro-batch that fits within {budget}: {report['max_batch']}{bound}")
            print(f"Fastest micro-batch among those tried: {report['best_batch']}")
        if report["stopped"]:
            print(f"Stopped early: {report['stopped']}")
    return 0 if report["max_batch"] is not None else 1


# ------------------------------------------------------------------------- predict
def _cmd_predict(args) -> int:
    config = config_from_args(args)
    margin = _margin(args.margin)
    typed = _number_list(args.capacity_gib, "--capacity-gib")
    device = resolve_device(config.device)
    device_type = device.split(":")[0]
    points = []
    if not args.analytic_only:
        points = [(b, p) for b, p, _ in predict.measured_points(_load_results(args), config, device_type)]
        wanted = _number_list(args.batches, "--batches", int)
        missing = [b for b in wanted if b not in {p[0] for p in points}] if len(points) < 2 else []
        if missing:
            show = _progress_printer()
            sink = _sinks(args)
            for batch in missing:
                result = run_isolated(config.replace(batch=batch),
                                      lambda e, b=batch: show({**e, "trial": len(points) + 1, "batch": b}))
                sink(result)
                show.line(result_line(result))
                if result["status"] == "ok":
                    points.append((batch, float(result["metrics"]["peak_allocated_bytes"])))
            points.sort()
    capacity = config.memory_cap_gib * GIB if config.memory_cap_gib else device_capacity_bytes(device)
    report = predict.report(points, config, predict.capacities(typed, capacity, device_type), margin)
    if args.json:
        _emit_json(report)
        return 0
    fit, analytic, comparison = report["fit"], report["analytic"], report["comparison"]
    if fit:
        print(f"Fit: peak ≈ {_gib(fit['fixed_bytes'])} + {_gib(fit['slope_bytes'])} × batch "
              f"(from batches {', '.join(str(b) for b, _ in fit['points'])})")
    elif not args.analytic_only:
        print("No fit: it needs ok measurements at two different batch sizes.")
    if analytic:
        parts = ", ".join(f"{k} {_gib(analytic[k])}" for k in ("params", "grads", "optimizer", "inputs", "activations", "transient", "peak"))
        print(f"Analytic at batch {config.batch}: {parts}")
        for note in analytic["notes"]:
            print(f"  {note}")
    if comparison:
        print()
        print(_table(("batch", "measured", "fitted", "error", "analytic", "error"), [
            (r["batch"], _gib(r["measured_bytes"]), _gib(r["fitted_bytes"]), _pct(r["fitted_error"]),
             _gib(r["analytic_bytes"]), _pct(r["analytic_error"])) for r in comparison]))
    print()
    print(f"Largest micro-batch with {margin:.0%} left free:")
    print(_table(("capacity", "fitted", "analytic"), [
        (r["capacity"], "-" if r["fitted_max_batch"] is None else r["fitted_max_batch"],
         "-" if r["analytic_max_batch"] is None else r["analytic_max_batch"]) for r in report["capacities"]]))
    return 0


# ------------------------------------------------------------------------- recommend
def _cmd_recommend(args) -> int:
    if not args.results and not args.db:
        raise CLIError("recommend needs --results FILE or --db PATH")
    if args.effective_batch < 1:
        raise CLIError(f"--effective-batch: {args.effective_batch} must be >= 1")
    if not args.memory_budget_gib > 0:
        raise CLIError(f"--memory-budget-gib: {args.memory_budget_gib} must be > 0")
    results = _load_results(args)
    try:
        answer = frontier.recommend(results, args.effective_batch, args.memory_budget_gib, args.model, args.device_name)
        missing = frontier.missing_candidates(results, args.effective_batch, args.memory_budget_gib, args.model, args.device_name)
    except frontier.SelectionError as exc:
        raise CLIError(f"{exc} (use --model / --device-name)") from None
    answer["missing_candidates"] = [c.to_dict() for c in missing]
    if args.json:
        _emit_json(answer)
    else:
        print(answer["answer"])
        if missing:
            print(f"Not measured yet ({len(missing)}), could change the answer: "
                  + "; ".join(frontier.config_words(c.to_dict()) for c in missing))
    return 0 if answer["fits"] else 1


# ------------------------------------------------------------------------- timeline
def _second_config(args, changes: list[str]):
    """The config of the flags with ``--vs KEY=VALUE`` changes applied (a config field, or
    a model dimension as with --set)."""
    second = argparse.Namespace(**vars(args))
    second.overrides = list(args.overrides or [])
    for item in changes:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise CLIError(f"--vs: {item!r} is not KEY=VALUE, e.g. ckpt=full")
        key = key.strip()
        if key in FIELD_NAMES and key != "overrides":
            setattr(second, key, value)
        else:
            second.overrides.append(f"{key}={value}")
    return config_from_args(second)


def _cmd_timeline(args) -> int:
    from .timeline import timelines

    configs = [config_from_args(args)]
    if args.vs:
        configs.append(_second_config(args, args.vs))
    print("recording one step of " + " and of ".join(frontier.config_words(c.to_dict()) for c in configs), file=sys.stderr)
    if len({c.device for c in configs}) > 1:
        raise CLIError("--vs: both timelines run on one device; overlay other settings, not the device")
    return _isolated_answer(args, lambda: timelines(configs), _print_timelines)


def _print_timelines(records: list[dict]) -> None:
    from .timeline import phase_peaks

    for record in records:
        print(f"{frontier.config_words(record['config'])}: peak {_gib(record['peak_bytes'])} in "
              f"{record['peak_phase']} at {record['peak_ms']:.1f} ms; before the step {_gib(record['baseline_bytes'])}")
        print(_table(("phase", "ms", "max", "min"), [
            (r["phase"], f"{r['ms']:.1f}", _gib(r["max_bytes"]), _gib(r["min_bytes"])) for r in phase_peaks(record)]))
        print(f"({record['source']})\n")


def _isolated_answer(args, measure, show) -> int:
    """Run an isolated measurement; print its JSON (--json) or ``show`` it. A failure in the
    isolated process (oom, error, timeout) is one line on stderr and exit code 1."""
    try:
        answer = measure()
    except IsolatedRunError as exc:
        print(f"{exc.status}: {exc}", file=sys.stderr)
        return 1
    if args.json:
        _emit_json(answer)
    else:
        show(answer)
    return 0


# ------------------------------------------------------------------------- pitfall
def _cmd_pitfall(args) -> int:
    from .pitfall import PHASE_KEYS, pitfall

    config = config_from_args(args)

    def show(report: dict) -> None:
        print(_table(("phase", "naive wall clock (ms)", f"{report['correct_method']} (ms)"), [
            (key[:-3], f"{report['naive'][key]['median']:.2f}", f"{report['correct'][key]['median']:.2f}")
            for key in PHASE_KEYS]))
        print(report["message"])

    return _isolated_answer(args, lambda: pitfall(config), show)


# ------------------------------------------------------------------------- registration
def _output_flags(parser) -> None:
    parser.add_argument("--out", metavar="FILE", help="append the runs made to this JSON Lines file")
    parser.add_argument("--db", metavar="PATH", help="store the runs made in this SQLite database")
    parser.add_argument("--json", action="store_true", help="print the answer as JSON on stdout")


def register(subparsers) -> None:
    """Add find-batch, predict, recommend, timeline and pitfall to ``python -m engine``."""
    p = subparsers.add_parser(
        "find-batch", help="largest micro-batch that fits, and the fastest one tried",
        description="Double the micro-batch from 1 until it does not fit (OOM or over the margin), then binary-search; "
                    "every trial is a real run in the worker. Exit code 1 when not even batch 1 fits.")
    add_config_flags(p)
    p.add_argument("--max-batch", type=int, default=1024, metavar="N", help="largest micro-batch to try (default 1024)")
    p.add_argument("--margin", type=float, default=predict.DEFAULT_MARGIN, metavar="F",
                   help="fraction of the capacity to leave free (default 0.05)")
    p.add_argument("--time-limit", type=float, metavar="S", help="stop the search after S seconds")
    _output_flags(p)
    p.set_defaults(func=_cmd_find_batch)

    p = subparsers.add_parser(
        "predict", help="predict peak memory and the largest batch per GPU size",
        description="Fit peak ≈ fixed + slope × batch to measured runs of this config (from --results/--db, "
                    "else measured now at --batches) and compare with the analytic estimate.")
    add_config_flags(p)
    p.add_argument("--batches", default="1,2,4", metavar="LIST", help="batches to measure when fewer than two are stored (default 1,2,4)")
    p.add_argument("--capacity-gib", default=",".join(f"{c:g}" for c in predict.DEFAULT_CAPACITIES_GIB), metavar="LIST",
                   help="GPU sizes to predict for (default 24,40,80,141)")
    p.add_argument("--margin", type=float, default=predict.DEFAULT_MARGIN, metavar="F", help="fraction to leave free (default 0.05)")
    p.add_argument("--results", action="append", metavar="FILE", help="results file with earlier runs (repeatable)")
    p.add_argument("--analytic-only", action="store_true", help="measure nothing; only the analytic estimate")
    _output_flags(p)
    p.set_defaults(func=_cmd_predict)

    p = subparsers.add_parser(
        "recommend", help="fastest stored configuration of an effective batch within a memory budget",
        description="Among ok runs with this effective batch whose peak allocated memory fits the budget, the "
                    "fastest and the runner-up. Exit code 1 when nothing fits.")
    p.add_argument("--results", action="append", metavar="FILE", help="results file (repeatable)")
    p.add_argument("--db", metavar="PATH", help="SQLite database of runs")
    p.add_argument("--effective-batch", type=int, required=True, metavar="N")
    p.add_argument("--memory-budget-gib", type=float, required=True, metavar="G")
    p.add_argument("--model", help="model (name or 'name (overrides)') when the runs hold several")
    p.add_argument("--device-name", help="device name when the runs come from several devices")
    p.add_argument("--json", action="store_true", help="print the answer as JSON on stdout")
    p.set_defaults(func=_cmd_recommend)

    p = subparsers.add_parser(
        "timeline", help="memory over one optimizer step, with phases",
        description="Record memory over one step (CUDA: allocator history; CPU: live tensors). "
                    "--vs KEY=VALUE records a second config for comparison, e.g. --vs ckpt=full.")
    add_config_flags(p)
    p.add_argument("--vs", action="append", default=[], metavar="KEY=VALUE",
                   help="change for a second, overlaid config (repeatable)")
    p.add_argument("--json", action="store_true", help="print the timelines as JSON on stdout")
    p.set_defaults(func=_cmd_timeline)

    p = subparsers.add_parser(
        "pitfall", help="the same step timed naively (wall clock) and correctly (device events)",
        description="Shows how unsynchronised wall-clock timing moves GPU time into the phase that synchronises.")
    add_config_flags(p)
    p.add_argument("--json", action="store_true", help="print the comparison as JSON on stdout")
    p.set_defaults(func=_cmd_pitfall)
