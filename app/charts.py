"""Pure plotly figure builders: ``build_x(results) -> go.Figure``.

No Streamlit in here: pages hand these figures to ``st.plotly_chart``, the HTML report embeds
the very same figures, and tests check them on ``fig.to_dict()``. Builders take v1 result
dicts in the order they should appear and draw one bar or point per run. Failed runs (oom,
timeout, error, cancelled) stay on every chart as marked placeholders with their status:
silently dropping the OOM of a sweep would hide the most important result.
"""
from __future__ import annotations

from typing import Callable

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from engine import frontier as _frontier
from engine import models
from engine import numerics as _numerics
from engine.config import GIB
from engine.results import BREAKDOWN_KEYS

THROUGHPUT_TITLE = "Throughput"
PEAK_MEMORY_TITLE = "Peak memory"
BACKWARD_TITLE = "Backward time"
PHASE_TITLE = "Phase breakdown"
MEMORY_BREAKDOWN_TITLE = "Memory breakdown"

FAILED_NAME = "failed runs"
FAILED_COLOR = "#d62728"
CAPACITY_COLOR = "#7f7f7f"
PHASES = (("forward_ms", "forward"), ("backward_ms", "backward"), ("optimizer_ms", "optimizer"))
# A capacity line this many times above the tallest bar would flatten every bar to nothing
# (a CPU run of a few MiB against the machine's RAM): the axis stops at the bars instead and
# a note names the line that is off the scale.
OFF_SCALE_FACTOR = 5.0
CHART_HEIGHT = 440

# Fields that can tell runs apart, in label order; "overrides" stands for every model
# dimension any of the runs overrides (seq_len, d_model...).
LABEL_FIELDS = ("model", "overrides", "batch", "accum", "precision", "ckpt", "optimizer", "memory_cap_gib", "device")
# Sweep charts may also use the effective batch (a fixed-effective-batch sweep varies it not at
# all, a batch sweep varies it with batch); labels never need it: batch and accum say it.
SWEEP_FIELDS = LABEL_FIELDS[:4] + ("effective_batch",) + LABEL_FIELDS[4:]
_FIELD_FORMATS = {
    "batch": "b{}",
    "accum": "accum {}",
    "ckpt": "ckpt {}",
    "model": "{}",
    "precision": "{}",
    "optimizer": "{}",
    "device": "{}",
}


# --------------------------------------------------------------------------- run fields
def device_name(result: dict) -> str:
    """The name of the device a run measured (from its environment), for legends and labels."""
    env = result.get("env") or {}
    return env.get("device_name") or env.get("device_type") or result["config"].get("device", "?")


def field_value(result: dict, field: str):
    """A run's value of a config field, a model dimension (``seq_len``...), ``effective_batch``
    or ``device``; a dimension the run did not override is the preset's value."""
    config = result["config"]
    if field == "device":
        return device_name(result)
    if field == "effective_batch":
        return result["metrics"].get("effective_batch") or config["batch"] * config.get("accum", 1)
    if field == "ckpt" and config.get("ckpt") == "every-k":
        return f"every-{config.get('k', '?')}"
    if field in config:
        return config[field]
    overrides = config.get("overrides") or {}
    if field in overrides or config["model"] not in models.PRESETS:
        return overrides.get(field)
    return models.preset_dims(config["model"], overrides)[1].get(field)


def _field_text(result: dict, field: str) -> str:
    value = field_value(result, field)
    if field == "memory_cap_gib":
        return f"cap {value:g} GiB" if value else "no cap"
    return _FIELD_FORMATS.get(field, field + "={}").format(value)


def varying_fields(results: list[dict], fields: tuple[str, ...] = LABEL_FIELDS) -> list[str]:
    """Those of ``fields`` whose value differs between the given runs (what a sweep swept);
    "overrides" expands to the model dimensions any run overrides."""
    dims = sorted({k for r in results for k in (r["config"].get("overrides") or {})})
    candidates = [d for f in fields for d in (dims if f == "overrides" else [f])]
    return [f for f in candidates if len({repr(field_value(r, f)) for r in results}) > 1]


def run_labels(results: list[dict]) -> list[str]:
    """One short, unique x-axis label per run built from the fields that differ between runs.

    A sweep over batch × precision reads "b4 · bf16" rather than repeating the model name on
    every bar; identical configs (repeats, or a teammate's run of the same settings) get the
    first characters of their id so no two bars share a category.
    """
    fields = varying_fields(results) or ["model", "batch", "precision", "ckpt"]
    labels = [" · ".join(_field_text(r, f) for f in fields) for r in results]
    counts = {label: labels.count(label) for label in labels}
    return [f"{label} #{r['id'][:6]}" if counts[label] > 1 else label for label, r in zip(labels, results)]


def _summary(result: dict, key: str) -> tuple[float, float, float] | None:
    summary = result["metrics"].get(key)
    if not summary:
        return None
    return summary["median"], summary["p10"], summary["p90"]


def throughput_unit(results: list[dict]) -> str:
    """tokens/s when every successful run has a sequence length, else samples/s."""
    ok = [r for r in results if r["status"] == "ok"]
    return "tokens/s" if ok and all(r["metrics"].get("tokens_per_s") is not None for r in ok) else "samples/s"


def throughput(result: dict, unit: str) -> tuple[float, float, float] | None:
    """(value, low, high) of a run's throughput in ``unit``.

    Throughput is effective batch / step time, so its spread comes from the step-time
    percentiles inverted: the p90 (slow) step gives the low end, the p10 step the high end.
    """
    value = result["metrics"].get("tokens_per_s" if unit == "tokens/s" else "samples_per_s")
    step = _summary(result, "step_ms")
    if value is None:
        return None
    if not step or not step[1] or not step[2]:
        return value, value, value
    median, p10, p90 = step
    return value, value * median / p90, value * median / p10


def peak_memory_gib(result: dict) -> tuple[float, None, None] | None:
    """Peak allocated memory in GiB (no spread: it is one number per run)."""
    peak = result["metrics"].get("peak_allocated_bytes")
    return None if peak is None else (peak / GIB, None, None)


def backward_ms(result: dict) -> tuple[float, float, float] | None:
    """Median, p10 and p90 of the backward phase per optimizer step, in ms."""
    return _summary(result, "backward_ms")


# --------------------------------------------------------------------------- shared pieces
def _error_bars(points: list[tuple]) -> dict | None:
    if all(p[1] is None for p in points):
        return None
    return dict(
        type="data",
        symmetric=False,
        array=[max(p[2] - p[0], 0.0) if p[2] is not None else 0.0 for p in points],
        arrayminus=[max(p[0] - p[1], 0.0) if p[1] is not None else 0.0 for p in points],
    )


def _failed_hover(result: dict) -> str:
    error = (result.get("error") or "").strip()
    short = error if len(error) <= 160 else error[:157] + "..."
    return f"{result['status'].upper()} on {device_name(result)}<br>{short}"


def _add_failed_placeholders(fig: go.Figure, results: list[dict], xs: list, upright: bool = False) -> None:
    """One marked point per failed run at y = 0, with its status (OOM, TIMEOUT...) above it.

    ``upright``: on per-run bar charts neighbouring failed runs are one narrow category apart,
    so each status is written upwards (a rotated annotation) where side by side they would
    run into each other.
    """
    failed = [i for i, r in enumerate(results) if r["status"] != "ok"]
    if not failed:
        return
    statuses = [results[i]["status"].upper() for i in failed]
    fig.add_scatter(
        name=FAILED_NAME,
        x=[xs[i] for i in failed],
        y=[0] * len(failed),
        mode="markers" if upright else "markers+text",
        showlegend=not upright,  # upright statuses label themselves
        marker=dict(symbol="x", size=14, color=FAILED_COLOR, line=dict(width=2)),
        text=None if upright else statuses,
        textposition="top center",
        textfont=dict(color=FAILED_COLOR),
        hovertext=[_failed_hover(results[i]) for i in failed],
        hoverinfo="text",
    )
    if upright:
        for i, status in zip(failed, statuses):
            fig.add_annotation(x=xs[i], y=0, text=status, textangle=-90, yanchor="bottom", yshift=10,
                               showarrow=False, font=dict(color=FAILED_COLOR))


def _layout(fig: go.Figure, title: str, y_title: str, categories: list[str], barmode: str) -> go.Figure:
    """Shared layout of the per-run charts: runs in their given order, y from zero.

    Legends never go below the plot, where they would collide with the tilted run labels: a
    stacked chart's parts are listed on the right, the devices of a per-run chart above the
    plot, one per line, with the top margin grown to fit them.
    """
    stacked = barmode == "stack"
    entries = sum(1 for trace in fig.data if trace.showlegend)
    fig.update_layout(
        # Pinned to the top: by default plotly centres the title in the top margin, which
        # grows with the legend and would push the title into it.
        title=dict(text=title, y=0.98, yanchor="top"),
        yaxis_title=y_title,
        barmode=barmode,
        height=CHART_HEIGHT,
        margin=dict(l=50, r=20, t=60 if stacked else 60 + 20 * entries, b=20),
        showlegend=entries > 0,
        legend=dict(orientation="v", x=1.02, y=1) if stacked else dict(orientation="v", yanchor="bottom", y=1.02, x=0),
    )
    fig.update_xaxes(type="category", categoryorder="array", categoryarray=categories, automargin=True)
    fig.update_yaxes(rangemode="nonnegative")  # even when every run failed and all that is drawn sits at 0
    return fig


def _per_run_bars(results: list[dict], title: str, unit: str, values: Callable[[dict], tuple | None]) -> go.Figure:
    """Bars of one value per successful run, one trace per device; with runs from more than one
    device the legend names them, so an H100 run beside a laptop run is visibly other hardware."""
    labels = run_labels(results)
    fig = go.Figure()
    by_device: dict[str, list[int]] = {}
    for i, result in enumerate(results):
        if result["status"] == "ok" and values(result) is not None:
            by_device.setdefault(device_name(result), []).append(i)
    for name, indices in by_device.items():
        points = [values(results[i]) for i in indices]
        fig.add_bar(
            name=name,
            x=[labels[i] for i in indices],
            y=[p[0] for p in points],
            error_y=_error_bars(points),
            showlegend=len(by_device) > 1,
            customdata=[results[i]["id"] for i in indices],
            hovertemplate=f"%{{x}}<br>%{{y:.4g}} {unit}<extra>{name}</extra>",
        )
    _add_failed_placeholders(fig, results, labels, upright=True)
    # barmode "overlay": each category holds exactly one bar, so grouping would only shift and
    # narrow bars to leave room for the other devices' empty slots.
    return _layout(fig, title, unit, labels, barmode="overlay")


# --------------------------------------------------------------------------- the three charts
def build_throughput(results: list[dict]) -> go.Figure:
    """Throughput per run (tokens/s or samples/s) with p10/p90 error bars."""
    unit = throughput_unit(results)
    return _per_run_bars(results, THROUGHPUT_TITLE, unit, lambda r: throughput(r, unit))


def capacity_lines(results: list[dict]) -> list[tuple[float, str]]:
    """(GiB, label) of each distinct memory limit: the run's memory cap, else its device capacity."""
    lines: dict[int, str] = {}
    for result in results:
        cap = result["config"].get("memory_cap_gib")
        capacity = (result.get("env") or {}).get("capacity_bytes")
        if cap:
            lines.setdefault(round(cap * GIB), f"memory cap {cap:g} GiB")
        elif capacity:
            lines.setdefault(int(capacity), f"{device_name(result)} capacity {capacity / GIB:.1f} GiB")
    return sorted((nbytes / GIB, label) for nbytes, label in lines.items())


def build_peak_memory(results: list[dict]) -> go.Figure:
    """Peak allocated memory per run in GiB, with the device capacity (or cap) as a line."""
    fig = _per_run_bars(results, PEAK_MEMORY_TITLE, "GiB", peak_memory_gib)
    bars = [p[0] for r in results if r["status"] == "ok" and (p := peak_memory_gib(r))]
    tallest = max(bars, default=0.0)
    lines = capacity_lines(results)
    off_scale = [label for gib, label in lines if tallest and gib > OFF_SCALE_FACTOR * tallest]
    for gib, label in lines:
        fig.add_hline(y=gib, line_dash="dash", line_color=CAPACITY_COLOR,
                      annotation_text=label, annotation_position="top left")
    if off_scale:
        top = max([tallest] + [gib for gib, label in lines if label not in off_scale])
        fig.update_yaxes(range=[0, top * 1.25])
        fig.update_layout(title_subtitle_text="off the scale: " + "; ".join(off_scale),
                          margin_t=fig.layout.margin.t + 20)
    return fig


def build_backward_time(results: list[dict]) -> go.Figure:
    """Backward time per optimizer step (median, p10/p90 error bars) in ms."""
    return _per_run_bars(results, BACKWARD_TITLE, "ms", backward_ms)


# --------------------------------------------------------------------------- breakdowns
def _stacked(results: list[dict], title: str, unit: str, parts: list[tuple[str, Callable[[dict], float | None]]]) -> go.Figure:
    labels = run_labels(results)
    ok = [i for i, r in enumerate(results) if r["status"] == "ok"]
    fig = go.Figure()
    for name, value in parts:
        fig.add_bar(
            name=name,
            x=[labels[i] for i in ok],
            y=[value(results[i]) for i in ok],
            showlegend=True,
            hovertemplate=f"%{{x}}<br>{name}: %{{y:.4g}} {unit}<extra></extra>",
        )
    _add_failed_placeholders(fig, results, labels, upright=True)
    return _layout(fig, title, unit, labels, barmode="stack")


def build_phase_breakdown(results: list[dict]) -> go.Figure:
    """Forward / backward / optimizer medians per run, stacked, in ms per optimizer step."""
    parts = [(name, lambda r, key=key: r["metrics"][key]["median"]) for key, name in PHASES]
    return _stacked(results, PHASE_TITLE, "ms", parts)


def build_memory_breakdown(results: list[dict]) -> go.Figure:
    """Params / grads / optimizer state / activations / other at the peak, stacked, in GiB."""

    def part(key: str) -> Callable[[dict], float | None]:
        def value(result: dict) -> float | None:
            breakdown = result["metrics"].get("memory_breakdown_bytes") or {}
            return None if breakdown.get(key) is None else breakdown[key] / GIB
        return value

    return _stacked(results, MEMORY_BREAKDOWN_TITLE, "GiB", [(key, part(key)) for key in BREAKDOWN_KEYS])


# --------------------------------------------------------------------------- sweep lines
# metric name -> (title, unit for given results, value function taking (result, unit))
SWEEP_METRICS: dict[str, tuple[str, Callable[[list[dict]], str], Callable[[dict, str], tuple | None]]] = {
    "throughput": (THROUGHPUT_TITLE, throughput_unit, throughput),
    "peak_memory": (PEAK_MEMORY_TITLE, lambda results: "GiB", lambda r, unit: peak_memory_gib(r)),
    "backward": (BACKWARD_TITLE, lambda results: "ms", lambda r, unit: backward_ms(r)),
    "step": ("Step time", lambda results: "ms", lambda r, unit: _summary(r, "step_ms")),
}


def sweep_fields(results: list[dict]) -> list[str]:
    """Fields a sweep chart can put on its x axis: those that vary between the runs."""
    return varying_fields(results, SWEEP_FIELDS)


def _determined_by(results: list[dict], field: str, other: str) -> bool:
    """Whether ``other`` is a function of ``field`` over these runs (accum in a fixed-effective-
    batch sweep over batch): splitting lines by it would give one point per line."""
    seen: dict[str, str] = {}
    for result in results:
        x, y = repr(field_value(result, field)), repr(field_value(result, other))
        if seen.setdefault(x, y) != y:
            return False
    return True


def build_sweep_lines(results: list[dict], field: str, metric: str = "throughput") -> go.Figure:
    """``metric`` against the swept ``field``, one line per combination of the other varied fields.

    Numeric fields (batch, accumulation...) go on a log axis because sweeps double them;
    failed runs sit at y = 0 as marked placeholders at their x value.
    """
    title, unit_of, value_of = SWEEP_METRICS[metric]
    unit = unit_of(results)
    others = [f for f in varying_fields(results, SWEEP_FIELDS) if f != field and not _determined_by(results, field, f)]
    xs = [field_value(r, field) for r in results]
    numeric = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in xs)
    if not numeric:
        xs = [str(x) for x in xs]  # categories, "None" (e.g. no memory cap) included
    groups: dict[str, list[int]] = {}
    for i, result in enumerate(results):
        name = ", ".join(f"{f}={field_value(result, f)}" for f in others) or "all runs"
        groups.setdefault(name, []).append(i)
    fig = go.Figure()
    for name, members in groups.items():
        ok = [(xs[i], value_of(results[i], unit)) for i in members if results[i]["status"] == "ok"]
        ok = [(x, p) for x, p in ok if p is not None]
        if numeric:
            ok.sort(key=lambda item: item[0])
        fig.add_scatter(
            name=name,
            x=[x for x, _ in ok],
            y=[p[0] for _, p in ok],
            error_y=_error_bars([p for _, p in ok]),
            mode="lines+markers",
            hovertemplate=f"{field}=%{{x}}<br>%{{y:.4g}} {unit}<extra>{name}</extra>",
        )
    _add_failed_placeholders(fig, results, xs)
    fig.update_layout(
        title=dict(text=f"{title} vs {field}"),
        xaxis_title=field,
        yaxis_title=unit,
        height=CHART_HEIGHT,
        margin=dict(l=50, r=20, t=60, b=40),
        yaxis_rangemode="nonnegative",
    )
    if numeric:
        ticks = sorted(set(xs))
        fig.update_xaxes(type="log", tickvals=ticks, ticktext=[f"{t:g}" for t in ticks])
    else:
        fig.update_xaxes(type="category")
    return fig


# --------------------------------------------------------------------------- presentation
def presentation_layout(fig: go.Figure, scale: float = 1.5) -> go.Figure:
    """A copy of ``fig`` with fonts and height scaled up for a projector."""
    big = go.Figure(fig)
    size = round(12 * scale)
    big.update_layout(font=dict(size=size), title_font_size=round(17 * scale), legend_font_size=size,
                      height=round(CHART_HEIGHT * scale))
    # Axis fonts are set explicitly: the dashboard's theme template sets them, and a template's
    # axis font wins over the figure-wide one.
    big.update_xaxes(tickfont_size=size, title_font_size=size)
    big.update_yaxes(tickfont_size=size, title_font_size=size)
    return big


# ---- Decision figures ----
# Figures of the decision page (app/views/decide.py): batch-finder trials, memory prediction,
# frontier and recommendation, memory timeline, timing pitfall, numerical cost. Same rules
# as the builders above: pure functions of engine outputs, tested on ``fig.to_dict()``.

FINDER_TITLE = "Batch finder trials"
PREDICTION_TITLE = "Memory prediction"
FRONTIER_TITLE = "Throughput vs peak memory"
TIMELINE_TITLE = "Memory over one step"
PITFALL_TITLE = "Timing pitfall"
NUMERICS_TITLE = "Numerical cost"
FIT_COLOR = "#1f77b4"
ANALYTIC_COLOR = "#ff7f0e"
OK_COLOR = "#2ca02c"
BUDGET_COLOR = "#9467bd"
# Light phase colours, so the strips under a timeline never look like one of its lines.
PHASE_COLORS = {"forward": "#9ecae1", "backward": "#fdae6b", "optimizer": "#a1d99b"}


def _memory_unit(values: list[float]) -> tuple[str, float]:
    """GiB, or MiB when everything is under 1 GiB (tiny CPU runs would read 0.00 GiB)."""
    return ("GiB", GIB) if max(values, default=0) >= GIB else ("MiB", 2**20)


def _words(config: dict) -> str:
    return _frontier.config_words(config)


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
    unit, scale = _memory_unit(peaks + ([] if off_scale else [capacity or 0]))
    unknown_peak = max(peaks, default=0) if off_scale or not capacity else capacity  # where an OOM is drawn
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    for fits, name, color, symbol in ((True, "fits", OK_COLOR, "circle"), (False, "does not fit", FAILED_COLOR, "x")):
        chosen = [t for t in trials if t["fits"] == fits]
        fig.add_scatter(
            name=name, x=[t["batch"] for t in chosen],
            y=[(t["peak_allocated_bytes"] if t["peak_allocated_bytes"] is not None else unknown_peak) / scale for t in chosen],
            mode="markers+text", marker=dict(color=color, symbol=symbol, size=12),
            text=[t["status"].upper() if t["status"] != "ok" else "" for t in chosen], textposition="top center",
            hovertemplate=f"batch %{{x}}<br>%{{y:.4g}} {unit}<extra>{name}</extra>",
        )
    rated = sorted((t for t in trials if t["samples_per_s"] is not None), key=lambda t: t["batch"])
    fig.add_scatter(name="samples/s", x=[t["batch"] for t in rated], y=[t["samples_per_s"] for t in rated],
                    mode="lines+markers", line=dict(color=FIT_COLOR, dash="dot"), secondary_y=True,
                    hovertemplate="batch %{x}<br>%{y:.4g} samples/s<extra></extra>")
    for value, label, color in ((capacity, "capacity", CAPACITY_COLOR), (budget, f"budget ({1 - report['margin']:.0%})", BUDGET_COLOR)):
        if value and not off_scale:
            fig.add_hline(y=value / scale, line_dash="dash", line_color=color, annotation_text=label,
                          annotation_position="top left")
    if off_scale:
        fig.add_annotation(xref="paper", yref="paper", x=1, y=1, xanchor="right", yanchor="bottom", showarrow=False,
                           text=f"off the scale: capacity {capacity / GIB:.1f} GiB, budget {budget / GIB:.1f} GiB",
                           font=dict(color=CAPACITY_COLOR))
    batches = sorted({t["batch"] for t in trials})
    fig.update_xaxes(type="log", title_text="micro-batch", tickvals=batches, ticktext=[str(b) for b in batches])
    fig.update_yaxes(title_text=f"peak allocated ({unit})", secondary_y=False)
    fig.update_yaxes(title_text="samples/s", secondary_y=True, rangemode="tozero")
    fig.update_layout(title=dict(text=FINDER_TITLE), height=CHART_HEIGHT, margin=dict(l=50, r=50, t=60, b=40),
                      legend=dict(orientation="h", yanchor="top", y=-0.25))
    return fig


def build_memory_prediction(report: dict) -> go.Figure:
    """Measured peaks, the fitted line and the analytic curve against the micro-batch
    (a ``predict.report``), with the capacities that are on the chart's scale."""
    curve = [(b, p) for b, p in report["curve"]]
    fit = report["fit"]
    fitted = [(b, fit["fixed_bytes"] + fit["slope_bytes"] * b) for b, _ in curve] if fit else []
    values = [p for _, p in report["points"]] + [p for _, p in curve if p is not None] + [p for _, p in fitted]
    unit, scale = _memory_unit(values)
    fig = go.Figure()
    fig.add_scatter(name="measured", x=[b for b, _ in report["points"]], y=[p / scale for _, p in report["points"]],
                    mode="markers", marker=dict(size=12, color="black"),
                    hovertemplate=f"batch %{{x}}<br>%{{y:.4g}} {unit}<extra>measured</extra>")
    if fitted:
        fig.add_scatter(name="fitted: fixed + slope × batch", x=[b for b, _ in fitted], y=[p / scale for _, p in fitted],
                        mode="lines", line=dict(color=FIT_COLOR),
                        hovertemplate=f"batch %{{x}}<br>%{{y:.4g}} {unit}<extra>fitted</extra>")
    if any(p is not None for _, p in curve):
        fig.add_scatter(name="analytic", x=[b for b, p in curve if p is not None],
                        y=[p / scale for _, p in curve if p is not None], mode="lines",
                        line=dict(color=ANALYTIC_COLOR, dash="dash"),
                        hovertemplate=f"batch %{{x}}<br>%{{y:.4g}} {unit}<extra>analytic</extra>")
    top = max(values, default=0)
    off_scale = []
    for row in report["capacities"]:
        if top and row["capacity_bytes"] > OFF_SCALE_FACTOR * top:
            off_scale.append(row["capacity"])
            continue
        fig.add_hline(y=row["capacity_bytes"] / scale, line_dash="dash", line_color=CAPACITY_COLOR,
                      annotation_text=row["capacity"], annotation_position="top left")
    if off_scale:
        fig.add_annotation(xref="paper", yref="paper", x=1, y=1, xanchor="right", yanchor="bottom", showarrow=False,
                           text="off the scale: " + ", ".join(off_scale), font=dict(color=CAPACITY_COLOR))
    fig.update_layout(title=dict(text=PREDICTION_TITLE), xaxis_title="micro-batch", yaxis_title=f"peak allocated ({unit})",
                      height=CHART_HEIGHT, margin=dict(l=50, r=20, t=60, b=40),
                      legend=dict(orientation="h", yanchor="top", y=-0.25))
    fig.update_yaxes(rangemode="tozero")
    return fig


def build_frontier(runs: list[dict], answer: dict | None = None) -> go.Figure:
    """Samples/s against peak memory of one model's runs, the Pareto frontier as a line, the
    device capacity (and the budget of ``answer``, a ``frontier.recommend`` result) as
    vertical lines, failed runs on the capacity line, and the best and runner-up marked."""
    ok = _frontier.measured(runs)
    failed = [r for r in runs if r["status"] != "ok"]
    capacities = [c for c in (_frontier.capacity_bytes(r) for r in runs) if c]
    capacity = max(capacities, default=None)
    budget = answer["memory_budget_bytes"] if answer else None
    peaks = [r["metrics"]["peak_allocated_bytes"] for r in ok]
    unit, scale = _memory_unit(peaks + [budget or 0])
    fig = go.Figure()
    fig.add_scatter(name="runs", x=[p / scale for p in peaks], y=[r["metrics"]["samples_per_s"] for r in ok],
                    mode="markers", marker=dict(size=9, color=CAPACITY_COLOR), text=[_words(r["config"]) for r in ok],
                    customdata=[r["id"] for r in ok],
                    hovertemplate=f"%{{text}}<br>%{{y:.4g}} samples/s at %{{x:.4g}} {unit}<extra></extra>")
    front = _frontier.pareto_frontier(runs)
    fig.add_scatter(name="Pareto frontier", x=[r["metrics"]["peak_allocated_bytes"] / scale for r in front],
                    y=[r["metrics"]["samples_per_s"] for r in front], mode="lines+markers",
                    line=dict(color=FIT_COLOR, shape="hv"), marker=dict(size=11, color=FIT_COLOR),
                    text=[_words(r["config"]) for r in front],
                    hovertemplate=f"%{{text}}<br>%{{y:.4g}} samples/s at %{{x:.4g}} {unit}<extra>frontier</extra>")
    if failed:
        x = (capacity or max(peaks, default=0)) / scale
        fig.add_scatter(name=FAILED_NAME, x=[x] * len(failed), y=[0] * len(failed), mode="markers+text",
                        marker=dict(symbol="x", size=14, color=FAILED_COLOR, line=dict(width=2)),
                        text=[r["status"].upper() for r in failed], textposition="top center",
                        hovertext=[f"{_words(r['config'])}<br>{_failed_hover(r)}" for r in failed], hoverinfo="text")
    for key, name, symbol in (("best", "best", "star"), ("runner_up", "runner-up", "diamond")):
        entry = answer.get(key) if answer else None
        if entry:
            fig.add_scatter(name=name, x=[entry["peak_allocated_bytes"] / scale], y=[entry["samples_per_s"]],
                            mode="markers", marker=dict(symbol=symbol, size=18, color=OK_COLOR, line=dict(width=1)),
                            text=[_words(entry["config"])], hovertemplate="%{text}<extra>" + name + "</extra>")
    if capacity:
        fig.add_vline(x=capacity / scale, line_dash="dash", line_color=CAPACITY_COLOR, annotation_text="capacity",
                      annotation_position="top left")
    if budget:
        fig.add_vline(x=budget / scale, line_dash="dot", line_color=BUDGET_COLOR, annotation_text="budget",
                      annotation_position="bottom left")
    fig.update_layout(title=dict(text=FRONTIER_TITLE), xaxis_title=f"peak allocated ({unit})", yaxis_title="samples/s",
                      height=CHART_HEIGHT, margin=dict(l=50, r=20, t=60, b=40),
                      legend=dict(orientation="h", yanchor="top", y=-0.25))
    fig.update_xaxes(rangemode="tozero")
    fig.update_yaxes(rangemode="tozero")
    return fig


def _record_labels(records: list[dict]) -> list[str]:
    words = [_words(r["config"]) for r in records]
    return [f"{w} ({i + 1})" if words.count(w) > 1 else w for i, w in enumerate(words)]


def build_memory_timeline(records: list[dict]) -> go.Figure:
    """Allocated memory over one optimizer step for one or two ``timeline`` records, lines
    overlaid on a shared ms axis, with each record's phases as a strip underneath."""
    labels = _record_labels(records)
    unit, scale = _memory_unit([v for r in records for v in r["bytes"]])
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, row_heights=[0.82, 0.18], vertical_spacing=0.04)
    for record, label in zip(records, labels):
        fig.add_scatter(name=label, x=record["t_ms"], y=[v / scale for v in record["bytes"]], mode="lines",
                        line=dict(shape="hv"), row=1, col=1,
                        hovertemplate=f"%{{x:.2f}} ms<br>%{{y:.4g}} {unit}<extra>{label}</extra>")
    shown = set()
    for record, label in zip(records, labels):
        for band in record["phases"]:
            phase = band["phase"].split()[0]  # "forward 2" -> "forward"
            fig.add_bar(name=phase, legendgroup=phase, showlegend=phase not in shown, orientation="h",
                        y=[label], base=[band["start_ms"]], x=[band["end_ms"] - band["start_ms"]],
                        marker_color=PHASE_COLORS.get(phase, CAPACITY_COLOR), row=2, col=1,
                        hovertemplate=f"{band['phase']}: %{{base:.2f}}–{band['end_ms']:.2f} ms<extra>{label}</extra>")
            shown.add(phase)
    fig.update_yaxes(title_text=f"allocated ({unit})", row=1, col=1)
    fig.update_yaxes(showticklabels=len(records) > 1, row=2, col=1)
    fig.update_xaxes(title_text="ms since the step started", row=2, col=1)
    fig.update_layout(title=dict(text=TIMELINE_TITLE), barmode="overlay", height=CHART_HEIGHT + 80,
                      margin=dict(l=50, r=20, t=60, b=40), legend=dict(orientation="h", yanchor="top", y=-0.2))
    return fig


def build_pitfall(report: dict) -> go.Figure:
    """Median ms per phase (p10/p90 error bars), naive wall clock beside the correct timer."""
    keys = [("forward_ms", "forward"), ("backward_ms", "backward"), ("optimizer_ms", "optimizer"), ("step_ms", "whole step")]
    fig = go.Figure()
    for method, name, color in (("naive", "naive wall clock (no sync)", FAILED_COLOR),
                                ("correct", report["correct_method"], OK_COLOR)):
        points = [(s["median"], s["p10"], s["p90"]) for s in (report[method][k] for k, _ in keys)]
        fig.add_bar(name=name, x=[label for _, label in keys], y=[p[0] for p in points], marker_color=color,
                    error_y=_error_bars(points), hovertemplate="%{x}<br>%{y:.3g} ms<extra>" + name + "</extra>")
    fig.update_layout(title=dict(text=PITFALL_TITLE), yaxis_title="ms per optimizer step", barmode="group",
                      height=CHART_HEIGHT, margin=dict(l=50, r=20, t=60, b=40),
                      legend=dict(orientation="h", yanchor="top", y=-0.2))
    return fig


def build_numerical_cost(results: list[dict]) -> go.Figure:
    """grad_rel_diff per ok run (against its fp32 / no-checkpointing baseline), with the
    speed-up and memory saving against the measured baseline run in the hover."""
    rows = _numerics.cost_rows(results)
    labels = dict(zip((r["id"] for r in results), run_labels(results)))
    shown = [row for row in rows if row["grad_rel_diff"] is not None]

    def gain(row: dict) -> str:
        speed = f"{row['speedup']:.2f}× samples/s" if row["speedup"] else "no baseline run"
        memory = f"{row['memory_saving']:+.0%} memory saved" if row["memory_saving"] is not None else ""
        return f"{speed}<br>{memory}"

    fig = go.Figure()
    fig.add_bar(name="grad_rel_diff", x=[labels[row["id"]] for row in shown], y=[row["grad_rel_diff"] for row in shown],
                text=[f"{row['grad_rel_diff']:.2e}" for row in shown], textposition="outside",
                hovertext=[gain(row) for row in shown], hovertemplate="%{x}<br>‖g − g_ref‖/‖g_ref‖ = %{y:.3e}<br>%{hovertext}<extra></extra>")
    fig.update_layout(title=dict(text=NUMERICS_TITLE), yaxis_title="‖g − g_ref‖ / ‖g_ref‖ (first step vs fp32)",
                      height=CHART_HEIGHT, margin=dict(l=50, r=20, t=60, b=40))
    fig.update_xaxes(type="category")
    return fig
