"""Figures of the Decide page: batch-finder trials, memory prediction, the frontier and the
recommendation, the memory timeline, the timing pitfall and the numerical cost.

Each builder draws what an engine call returned (``finder.find_batch``'s report,
``predict.report``, ``frontier.pareto_frontier`` and ``frontier.recommend``, timeline
records, ``pitfall``'s report, ``gains.gain_rows``); none of them re-runs the analysis.
"""
from __future__ import annotations

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from engine import frontier
from engine.config import GIB, BenchConfig, gib_words
from engine.results import Result

from .common import (ANALYTIC_COLOR, BUDGET_COLOR, CAPACITY_COLOR, CHART_HEIGHT, FAILED_COLOR, FAILED_NAME, FIT_COLOR,
                     OFF_SCALE_FACTOR, OK_COLOR, above_chart, chart_text, describe, error_bars, failed_hover,
                     failed_marker, layout, limit_line, memory_unit, precision_color)
from .runs import PHASES, chart_labels

FINDER_TITLE = "Batch finder trials"
PREDICTION_TITLE = "Memory prediction"
FRONTIER_TITLE = "Throughput vs peak memory"
TIMELINE_TITLE = "Memory over one step"
PITFALL_TITLE = "Timing pitfall"
NUMERICS_TITLE = "Numerical cost"
# Light phase colours, so the strips under a timeline never look like one of its lines.
PHASE_COLORS = {"forward": "#9ecae1", "backward": "#fdae6b", "optimizer": "#a1d99b"}


def _words(config: dict | BenchConfig) -> str:
    """A configuration (as an engine report holds it) in words, without the model, for a figure."""
    return chart_text((config if isinstance(config, BenchConfig) else BenchConfig.from_dict(config)).describe(with_model=False))


def build_finder_trials(report: dict) -> go.Figure:
    """Peak memory of every batch-finder trial against its micro-batch (log axis), with the
    budget and capacity lines, and samples/s of the ok trials on a second axis. Trials that
    did not fit are red; out-of-memory ones sit on the capacity line (their peak is unknown)."""
    trials = report["trials"]
    capacity, budget = report.get("capacity_bytes"), report.get("budget_bytes")
    peaks = [t["peak_allocated_bytes"] for t in trials if t["peak_allocated_bytes"] is not None]
    # A CPU search stopped by --max-batch far below the machine's RAM: draw the trials, and
    # name the lines instead of flattening every point against them.
    off_scale = bool(capacity and peaks and capacity > OFF_SCALE_FACTOR * max(peaks))
    unit, scale = memory_unit(peaks + ([] if off_scale else [capacity or 0]))
    unknown_peak = max(peaks, default=0) if off_scale or not capacity else capacity  # where an OOM is drawn
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    for fits, name, color, symbol in ((True, "fits", OK_COLOR, "circle"), (False, "does not fit", FAILED_COLOR, "x")):
        chosen = [t for t in trials if t["fits"] == fits]
        fig.add_scatter(
            name=name, x=[t["batch"] for t in chosen],
            y=[(t["peak_allocated_bytes"] if t["peak_allocated_bytes"] is not None else unknown_peak) / scale for t in chosen],
            mode="markers+text", marker=dict(color=color, symbol=symbol, size=12),
            text=[t["status"].upper() if t["status"] != "ok" else "" for t in chosen], textposition="top center",
            hovertemplate=f"batch %{{x}}<br>%{{y:.3g}} {unit}<extra>{name}</extra>",
        )
    rated = sorted((t for t in trials if t["samples_per_s"] is not None), key=lambda t: t["batch"])
    fig.add_scatter(name="samples/s", x=[t["batch"] for t in rated], y=[t["samples_per_s"] for t in rated],
                    mode="lines+markers", line=dict(color=FIT_COLOR, dash="dot"), secondary_y=True,
                    hovertemplate="batch %{x}<br>%{y:.3g} samples/s<extra></extra>")
    if not off_scale:
        for value, label, color in ((capacity, "capacity", CAPACITY_COLOR),
                                    (budget, f"budget ({1 - report['margin']:.0%})", BUDGET_COLOR)):
            if value:
                limit_line(fig, value / scale, label, color)
    batches = sorted({t["batch"] for t in trials})
    fig.update_xaxes(type="log", title_text="micro-batch", tickvals=batches, ticktext=[str(b) for b in batches])
    fig.update_yaxes(title_text=f"peak allocated ({unit})", secondary_y=False)
    fig.update_yaxes(title_text="samples/s", secondary_y=True, rangemode="tozero")
    layout(fig, FINDER_TITLE, legend="below", right=50)
    describe(fig, "Every trial of the search: its peak memory (left axis) and samples/s (dotted, right axis)")
    if off_scale:
        describe(fig, above_chart("device capacity", capacity / GIB) + f"; memory budget {gib_words(budget)}")
    return fig


def build_memory_prediction(report: dict) -> go.Figure:
    """Measured peaks, the fitted line and the analytic curve against the micro-batch
    (a ``predict.report``), with the capacities that are on the chart's scale."""
    curve = [(b, p) for b, p in report["curve"]]
    fit = report["fit"]
    fitted = [(b, fit["fixed_bytes"] + fit["slope_bytes"] * b) for b, _ in curve] if fit else []
    values = [p for _, p in report["points"]] + [p for _, p in curve if p is not None] + [p for _, p in fitted]
    unit, scale = memory_unit(values)
    fig = go.Figure()
    fig.add_scatter(name="measured", x=[b for b, _ in report["points"]], y=[p / scale for _, p in report["points"]],
                    mode="markers", marker=dict(size=12, color="black"),
                    hovertemplate=f"batch %{{x}}<br>%{{y:.3g}} {unit}<extra>measured</extra>")
    if fitted:
        fig.add_scatter(name="fitted: fixed + slope × batch", x=[b for b, _ in fitted], y=[p / scale for _, p in fitted],
                        mode="lines", line=dict(color=FIT_COLOR),
                        hovertemplate=f"batch %{{x}}<br>%{{y:.3g}} {unit}<extra>fitted</extra>")
    if any(p is not None for _, p in curve):
        fig.add_scatter(name="analytic", x=[b for b, p in curve if p is not None],
                        y=[p / scale for _, p in curve if p is not None], mode="lines",
                        line=dict(color=ANALYTIC_COLOR, dash="dash"),
                        hovertemplate=f"batch %{{x}}<br>%{{y:.3g}} {unit}<extra>analytic</extra>")
    top = max(values, default=0)
    off_scale = []
    for row in report["capacities"]:
        if top and row["capacity_bytes"] > OFF_SCALE_FACTOR * top:
            off_scale.append(above_chart(chart_text(f"capacity of {row['capacity']}"), row["capacity_bytes"] / GIB))
        else:
            limit_line(fig, row["capacity_bytes"] / scale, chart_text(row["capacity"]))
    fig.update_yaxes(rangemode="tozero")
    layout(fig, PREDICTION_TITLE, x_title="micro-batch", y_title=f"peak allocated ({unit})", legend="below")
    describe(fig, "Dots: measured peaks; line: least-squares fit through the points whose peak grows; "
                  "dashes: the analytic estimate")
    for words in off_scale:
        describe(fig, words)
    return fig


def build_frontier(runs: list[Result], front: list[Result], answer: dict | None = None) -> go.Figure:
    """Samples/s against peak memory of one model's runs, the Pareto frontier ``front`` (from
    ``frontier.pareto_frontier``) as a line, the memory limit (and the budget of ``answer``, a
    ``frontier.recommend`` result) as vertical lines, failed runs on the limit line, and the
    best and runner-up marked."""
    ok = frontier.measured(runs)
    failed = [r for r in runs if not r.ok]
    capacity = max((limit for r in runs if (limit := r.memory_limit_bytes)), default=None)
    budget = answer["memory_budget_bytes"] if answer else None
    peaks = [r.metrics.peak_allocated_bytes for r in ok]
    unit, scale = memory_unit(peaks + [budget or 0])
    fig = go.Figure()
    for precision in dict.fromkeys(r.config.precision for r in ok):
        mine = [(r, p) for r, p in zip(ok, peaks) if r.config.precision == precision]
        fig.add_scatter(name=f"{precision} runs", x=[p / scale for _, p in mine],
                        y=[r.metrics.samples_per_s for r, _ in mine], mode="markers",
                        marker=dict(size=9, color=precision_color(precision)), text=[_words(r.config) for r, _ in mine],
                        customdata=[r.id for r, _ in mine],
                        hovertemplate=f"%{{text}}<br>%{{y:.3g}} samples/s at %{{x:.3g}} {unit}<extra></extra>")
    fig.add_scatter(name="Pareto frontier", x=[r.metrics.peak_allocated_bytes / scale for r in front],
                    y=[r.metrics.samples_per_s for r in front], mode="lines+markers",
                    line=dict(color=FIT_COLOR, shape="hv"), marker=dict(size=11, color=FIT_COLOR),
                    text=[_words(r.config) for r in front],
                    hovertemplate=f"%{{text}}<br>%{{y:.3g}} samples/s at %{{x:.3g}} {unit}<extra>frontier</extra>")
    if failed:
        x = (capacity or max(peaks, default=0)) / scale
        fig.add_scatter(name=FAILED_NAME, x=[x] * len(failed), y=[0] * len(failed), mode="markers+text",
                        marker=failed_marker(), text=[r.status.upper() for r in failed], textposition="top center",
                        hovertext=[f"{_words(r.config)}<br>{failed_hover(r)}" for r in failed], hoverinfo="text")
    for key, name, symbol in (("best", "best", "star"), ("runner_up", "runner-up", "diamond")):
        entry = answer.get(key) if answer else None
        if entry:
            fig.add_scatter(name=name, x=[entry["peak_allocated_bytes"] / scale], y=[entry["samples_per_s"]],
                            mode="markers", marker=dict(symbol=symbol, size=18, color=OK_COLOR, line=dict(width=1)),
                            text=[_words(entry["config"])], hovertemplate="%{text}<extra>" + name + "</extra>")
    # Zoomed to the runs and the budget: a CPU's 23.5 GiB capacity would squeeze runs of a few
    # MiB into the y axis. A capacity far to the right is said in words instead.
    right = max(peaks + [budget or 0], default=0) / scale * 1.1 or None
    capacity_off = bool(capacity and right and capacity / scale > right * OFF_SCALE_FACTOR)
    if capacity and not capacity_off:
        fig.add_vline(x=capacity / scale, line_dash="dash", line_color=CAPACITY_COLOR, annotation_text="capacity",
                      annotation_position="top left")
        right = max(right or 0, capacity / scale * 1.05)
    if budget:
        fig.add_vline(x=budget / scale, line_dash="dot", line_color=BUDGET_COLOR, annotation_text="budget",
                      annotation_position="bottom left")
    fig.update_xaxes(range=[0, right] if right else None, rangemode="tozero")
    fig.update_yaxes(rangemode="tozero")
    layout(fig, FRONTIER_TITLE, x_title=f"peak allocated ({unit})", y_title="samples/s", legend="below")
    describe(fig, "Each dot is a measured run, coloured by precision; the line joins the runs nothing beats "
                  "on both speed and memory")
    if capacity_off:
        describe(fig, f"capacity {gib_words(capacity)}, to the right of the chart")
    return fig


def _record_labels(records: list[dict]) -> list[str]:
    words = [_words(r["config"]) for r in records]
    return [f"{w} ({i + 1})" if words.count(w) > 1 else w for i, w in enumerate(words)]


def build_memory_timeline(records: list[dict]) -> go.Figure:
    """Allocated memory over one optimizer step for one or two ``timeline`` records, lines
    overlaid on a shared ms axis, with each record's phases as a strip underneath."""
    labels = _record_labels(records)
    unit, scale = memory_unit([v for r in records for v in r["bytes"]])
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, row_heights=[0.82, 0.18], vertical_spacing=0.04)
    for record, label in zip(records, labels):
        fig.add_scatter(name=label, x=record["t_ms"], y=[v / scale for v in record["bytes"]], mode="lines",
                        line=dict(shape="hv"), row=1, col=1,
                        hovertemplate=f"%{{x:.2f}} ms<br>%{{y:.3g}} {unit}<extra>{label}</extra>")
    shown = set()
    for record, label in zip(records, labels):
        for band in record["phases"]:
            phase = band["phase"].split()[0]  # "forward 2" -> "forward"
            fig.add_bar(name=phase, legendgroup=phase, showlegend=phase not in shown, orientation="h",
                        y=[label], base=[band["start_ms"]], x=[band["end_ms"] - band["start_ms"]],
                        marker_color=PHASE_COLORS.get(phase, CAPACITY_COLOR), row=2, col=1,
                        hovertemplate=f"{band['phase']}: %{{base:.2f}}–{band['end_ms']:.2f} ms, "
                                      f"{band.get('gpu_ms', band['end_ms'] - band['start_ms']):.2f} ms on the device"
                                      f"<extra>{label}</extra>")
            shown.add(phase)
    fig.update_yaxes(title_text=f"allocated ({unit})", rangemode="tozero", row=1, col=1)
    fig.update_yaxes(showticklabels=len(records) > 1, row=2, col=1)
    # On CUDA the samples are host time (allocation order), not GPU time: the record says so.
    fig.update_xaxes(title_text=records[0].get("time_axis", "ms since the step started"), row=2, col=1)
    # Taller than the other charts: the phase strips take room from the plot.
    layout(fig, TIMELINE_TITLE, legend="below", barmode="overlay", height=CHART_HEIGHT + 80)
    return describe(fig, "Allocated memory over one optimizer step; the strips below show its phases")


def build_pitfall(report: dict) -> go.Figure:
    """Median ms per phase (p10/p90 error bars), naive wall clock beside the correct timer."""
    keys = [*PHASES, ("step_ms", "whole step")]
    fig = go.Figure()
    for method, name, color in (("naive", "naive wall clock (no sync)", FAILED_COLOR),
                                ("correct", report["correct_method"], OK_COLOR)):
        points = [(s["median"], s["p10"], s["p90"]) for s in (report[method][k] for k, _ in keys)]
        fig.add_bar(name=name, x=[label for _, label in keys], y=[p[0] for p in points], marker_color=color,
                    error_y=error_bars(points), hovertemplate="%{x}<br>%{y:.3g} ms<extra>" + name + "</extra>")
    layout(fig, PITFALL_TITLE, y_title="ms per optimizer step", legend="below", barmode="group")
    return describe(fig, "The same steps timed both ways: medians, error bars 10th–90th percentile")


def build_numerical_cost(rows: list[dict], results: list[Result]) -> go.Figure:
    """grad_rel_diff per ok run (``rows`` from ``gains.gain_rows(results)``, each against
    its fp32 / no-checkpointing baseline), with the speed-up and memory saving against the
    measured baseline run in the hover; runs are labelled as on the other charts of ``results``."""
    labels = dict(zip((r.id for r in results), chart_labels(results)))
    shown = [row for row in rows if row["grad_rel_diff"] is not None]

    def gain(row: dict) -> str:
        speed = f"{row['speedup']:.2f}× samples/s" if row["speedup"] else "no speed-up"
        memory = f"{row['memory_saving']:+.0%} memory saved" if row["memory_saving"] is not None else ""
        return f"{speed}<br>{memory}<br>baseline: {chart_text(row['baseline'])}"

    fig = go.Figure()
    fig.add_bar(name="grad_rel_diff", x=[labels[row["id"]] for row in shown], y=[row["grad_rel_diff"] for row in shown],
                text=[f"{row['grad_rel_diff']:.2e}" for row in shown], textposition="outside",
                hovertext=[gain(row) for row in shown],
                hovertemplate="%{x}<br>‖g − g_ref‖/‖g_ref‖ = %{y:.3e}<br>%{hovertext}<extra></extra>")
    fig.update_xaxes(type="category")
    layout(fig, NUMERICS_TITLE, y_title="‖g − g_ref‖ / ‖g_ref‖ (first step vs fp32)")
    if not shown:
        fig.add_annotation(xref="paper", yref="paper", x=0.5, y=0.5, showarrow=False,
                           text="Nothing to show: none of these runs compared its gradients with fp32<br>"
                                "(fp32 runs without checkpointing are the reference)")
        fig.update_xaxes(visible=False)
        fig.update_yaxes(visible=False)
    else:
        describe(fig, "Relative difference of the first step's gradients from an fp32 run without checkpointing")
    return fig
