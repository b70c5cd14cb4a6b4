"""The decision commands: find-batch, predict, recommend, timeline, pitfall.

They take the same config flags as ``run``, print a readable answer (or ``--json`` on
stdout), show progress on stderr, and raise ConfigError/CLIError for bad input, which
``main`` turns into one stderr line and exit code 2. Exit code 1 means the input was fine
but the answer is negative (nothing fits, the measurement failed).
"""
from __future__ import annotations

import argparse
import sys

from .. import finder, frontier, limits, predict
from ..config import FIELD_NAMES, BenchConfig, check_runnable, device_memory_limit
from ..devices import resolve_device, this_host_id
from .common import (CLIError, ProgressPrinter, add_config_flags, add_output_flags, config_from_args, emit_json,
                     fmt_bytes, fmt_pct, load_results, margin, number_list, result_sinks, table)


# ------------------------------------------------------------------------- find-batch
def _cmd_find_batch(args) -> int:
    config = config_from_args(args)
    # No memory check: the search starts at batch 1 whatever --batch says, and its trials
    # must meet their real OOMs, which are its answer.
    check_runnable(config, check_memory=False)
    keep = margin(args.margin)
    if args.max_batch < 1:
        raise CLIError(f"--max-batch: {args.max_batch} must be >= 1")
    most = limits.limit_for("batch")
    if args.max_batch > most:
        raise CLIError(f"--max-batch: {args.max_batch} is above this server's largest micro-batch, {most:g} "
                       f"({limits.LIMITS_BY_FIELD['batch'].variable})")
    if args.time_limit is not None and not args.time_limit > 0:
        raise CLIError(f"--time-limit: {args.time_limit} must be > 0 seconds")
    printer = ProgressPrinter()
    report = finder.find_batch(
        config, max_batch=args.max_batch, margin=keep, time_limit_s=args.time_limit,
        progress=printer, on_result=result_sinks(args, printer, print_json=False),
    )
    if args.json:
        emit_json(report)
    else:
        rows = [(t["batch"], t["status"], "yes" if t["fits"] else "no", fmt_bytes(t["peak_allocated_bytes"]),
                 "-" if t["samples_per_s"] is None else f"{t['samples_per_s']:,.1f}") for t in report["trials"]]
        print(table(("batch", "status", "fits", "peak alloc", "samples/s"), rows))
        budget = f"{fmt_bytes(report['budget_bytes'])} ({1 - keep:.0%} of {fmt_bytes(report['capacity_bytes'])})"
        if report["max_batch"] is None:
            print(f"No micro-batch fits within {budget}.")
        else:
            largest = f"{report['max_batch']}" if report["exact"] else f"≥ {report['max_batch']} (a lower bound: {report['stopped']})"
            print(f"Largest micro-batch that fits within {budget}: {largest}")
            print(f"Fastest micro-batch among those tried: {report['best_batch']}")
        if report["stopped"] and report["max_batch"] is None:
            print(f"Stopped early: {report['stopped']}")
    return 0 if report["max_batch"] is not None else 1


# ------------------------------------------------------------------------- predict
def _cmd_predict(args) -> int:
    config = config_from_args(args)
    keep = margin(args.margin)
    typed = number_list(args.capacity_gib, "--capacity-gib")
    wanted = None if args.batches.strip() == "auto" else number_list(args.batches, "--batches", int)
    device_type = resolve_device(config.device).split(":")[0]
    points, stopped = [], None
    if not args.analytic_only:
        # --batch only names the analytic estimate's batch here; the runs are --batches.
        check_runnable(config, check_memory=False)
        points = [(b, p) for b, p, _ in predict.measured_points(load_results(args), config, device_type, this_host_id())]
        for run_config in predict.missing_configs(config, points, wanted or []):
            check_runnable(run_config)  # the batches asked for, each within this server's limits
        printer = ProgressPrinter()
        # Doubling stops at this server's largest micro-batch; its runs meet their real OOMs.
        points, stopped = predict.measure_for_fit(config, points, wanted, limit=int(limits.limit_for("batch")),
                                                  progress=printer,
                                                  on_result=result_sinks(args, printer, print_json=False))
    targets = predict.capacities(typed, device_memory_limit(config), device_type, capped=config.memory_cap_gib is not None)
    report = predict.report(points, config, targets, keep)
    if args.json:
        emit_json(report)
        return 0
    fit, analytic, comparison = report["fit"], report["analytic"], report["comparison"]
    if stopped:
        print(f"Note: {stopped}")
    if fit:
        left_out = f"; batches {', '.join(map(str, fit['left_out']))} left out: the peak does not grow there" \
            if fit["left_out"] else ""
        print(f"Fit: peak ≈ {fmt_bytes(fit['fixed_bytes'])} + {fmt_bytes(fit['slope_bytes'])} × batch "
              f"(from batches {', '.join(str(b) for b, _ in fit['points'])}{left_out}; largest miss "
              f"{fit['max_error']:.1%})")
    elif not args.analytic_only:
        print(f"No fit: {report['fit_problem']}.")
    if analytic:
        parts = ", ".join(f"{k} {fmt_bytes(analytic[k])}" for k in ("params", "grads", "optimizer", "data_parallel", "inputs", "activations", "transient", "peak")
                          if analytic.get(k) or k != "data_parallel")
        print(f"Analytic at batch {config.batch}: {parts}")
        for note in analytic["notes"]:
            print(f"  {note}")
    if comparison:
        print()
        print(table(("batch", "measured", "fitted", "error", "analytic", "error"), [
            (r["batch"], fmt_bytes(r["measured_bytes"]), fmt_bytes(r["fitted_bytes"]), fmt_pct(r["fitted_error"]),
             fmt_bytes(r["analytic_bytes"]), fmt_pct(r["analytic_error"])) for r in comparison]))
    print()
    print(f"Largest micro-batch with {keep:.0%} left free:")
    print(table(("capacity", "fitted", "analytic"), [
        (r["capacity"], "-" if r["fitted_max_batch"] is None else r["fitted_max_batch"],
         "-" if r["analytic_max_batch"] is None else r["analytic_max_batch"]) for r in report["capacities"]]))
    return 0


# ------------------------------------------------------------------------- recommend
def _cmd_recommend(args) -> int:
    if not args.results and args.db is None:
        raise CLIError("recommend needs --results FILE or --db PATH")
    if args.effective_batch < 1:
        raise CLIError(f"--effective-batch: {args.effective_batch} must be >= 1")
    if not 0 < args.memory_budget_gib < float("inf"):
        raise CLIError(f"--memory-budget-gib: {args.memory_budget_gib} must be a number > 0")
    results = load_results(args)
    try:
        here = this_host_id()
        answer = frontier.recommend(results, args.effective_batch, args.memory_budget_gib, args.model, args.env, here)
        missing = frontier.missing_candidates(results, args.effective_batch, args.memory_budget_gib, args.model,
                                              args.env, here)
    except frontier.SelectionError as exc:
        raise CLIError(f"{exc} (use --model / --env ID)") from None
    answer["missing_candidates"] = [c.to_dict() for c in missing]
    if args.json:
        emit_json(answer)
    else:
        print(answer["answer"])
        print(f"From the runs of: {answer['environment']}")
        if missing:
            print(f"Not measured yet ({len(missing)}), could change the answer: "
                  + "; ".join(c.describe(with_model=False) for c in missing))
    return 0 if answer["fits"] else 1


# ------------------------------------------------------------------------- timeline
def _second_config(args, changes: list[str]) -> BenchConfig:
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
    from ..timeline import phase_peaks, timelines

    configs = [config_from_args(args)]
    if args.vs:
        configs.append(_second_config(args, args.vs))
    if len({c.device for c in configs}) > 1:
        raise CLIError("--vs: both timelines run on one device; overlay other settings, not the device")
    for config in configs:
        check_runnable(config)
    print("recording one step of " + " and of ".join(c.describe(with_model=False) for c in configs), file=sys.stderr)

    def show(records: list[dict]) -> None:
        for record in records:
            print(f"{BenchConfig.from_dict(record['config']).describe(with_model=False)}: peak "
                  f"{fmt_bytes(record['peak_bytes'])} in {record['peak_phase']} at {record['peak_ms']:.1f} ms; "
                  f"before the step {fmt_bytes(record['baseline_bytes'])}")
            print(table(("phase", "ms", "max", "min"), [
                (r["phase"], f"{r['ms']:.1f}", fmt_bytes(r["max_bytes"]), fmt_bytes(r["min_bytes"])) for r in phase_peaks(record)]))
            print(f"({record['source']})\n")

    return _answer(args, timelines(configs, ProgressPrinter()), show)


def _answer(args, outcome, show) -> int:
    """Print an isolated measurement's answer (JSON with --json), or its failure (oom,
    error, timeout) as one line on stderr with exit code 1."""
    if not outcome.ok:
        print(f"{outcome.status}: {outcome.error}", file=sys.stderr)
        return 1
    if args.json:
        emit_json(outcome.value)
    else:
        show(outcome.value)
    return 0


# ------------------------------------------------------------------------- pitfall
def _cmd_pitfall(args) -> int:
    from ..pitfall import PHASE_KEYS, pitfall

    config = config_from_args(args)
    check_runnable(config)

    def show(report: dict) -> None:
        print(table(("phase", "naive wall clock (ms)", f"{report['correct_method']} (ms)"), [
            (key[:-3], f"{report['naive'][key]['median']:.2f}", f"{report['correct'][key]['median']:.2f}")
            for key in PHASE_KEYS]))
        print(report["message"])

    return _answer(args, pitfall(config, ProgressPrinter()), show)


# ------------------------------------------------------------------------- registration
def _margin_flag(parser) -> None:
    parser.add_argument("--margin", type=float, default=predict.DEFAULT_MARGIN, metavar="F",
                        help=f"fraction of the capacity to leave free (default {predict.DEFAULT_MARGIN:g})")


def register(subparsers) -> None:
    """Add find-batch, predict, recommend, timeline and pitfall to ``python -m engine``."""
    p = subparsers.add_parser(
        "find-batch", help="largest micro-batch that fits, and the fastest one tried",
        description="Double the micro-batch from 1 until it does not fit (OOM or over the margin), then binary-search; "
                    "every trial is a real run in the worker. Exit code 1 when not even batch 1 fits.")
    add_config_flags(p)
    p.add_argument("--max-batch", type=int, default=finder.DEFAULT_MAX_BATCH, metavar="N",
                   help=f"largest micro-batch to try (default {finder.DEFAULT_MAX_BATCH})")
    _margin_flag(p)
    p.add_argument("--time-limit", type=float, default=finder.DEFAULT_TIME_LIMIT_S, metavar="S",
                   help=f"stop the search after S seconds (default {finder.DEFAULT_TIME_LIMIT_S:g})")
    add_output_flags(p, json_help="print the answer as JSON on stdout")
    p.set_defaults(func=_cmd_find_batch)

    p = subparsers.add_parser(
        "predict", help="predict peak memory and the largest batch per GPU size",
        description="Fit peak ≈ fixed + slope × batch to the measured runs of this config whose peak grows with the "
                    "batch (from --results/--db, plus the --batches measured now) and compare with the analytic "
                    "estimate.")
    add_config_flags(p)
    p.add_argument("--batches", default="auto", metavar="LIST",
                   help="batches to measure when not stored yet, or auto: double from 1 until the peak grows (default)")
    p.add_argument("--capacity-gib", default=",".join(f"{c:g}" for c in predict.DEFAULT_CAPACITIES_GIB), metavar="LIST",
                   help="GPU sizes to predict for (default 24,40,80,141)")
    _margin_flag(p)
    p.add_argument("--results", action="append", metavar="FILE", help="results file with earlier runs (repeatable)")
    p.add_argument("--analytic-only", action="store_true", help="measure nothing; only the analytic estimate")
    add_output_flags(p, json_help="print the answer as JSON on stdout")
    p.set_defaults(func=_cmd_predict)

    p = subparsers.add_parser(
        "recommend", help="fastest stored configuration of an effective batch within a memory budget",
        description="Among ok runs with this effective batch whose peak allocated memory fits the budget, the "
                    "fastest and the runner-up. Exit code 1 when nothing fits.")
    p.add_argument("--results", action="append", metavar="FILE", help="results file (repeatable)")
    p.add_argument("--db", metavar="PATH", help="database of runs (SQLite file or postgresql:// URL)")
    p.add_argument("--effective-batch", type=int, required=True, metavar="N")
    p.add_argument("--memory-budget-gib", type=float, required=True, metavar="G")
    p.add_argument("--model", help="model (name or 'name (overrides)') when the runs hold several")
    p.add_argument("--env", metavar="ID", help="environment id (in brackets in the message that lists them) when "
                   "the runs come from several; default: the runs measured on this machine")
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
