"""Per-run figures: the three main charts, the phase and memory breakdowns and sweep lines.

Builders take Results in the order they should appear and draw one bar or point per run.
Failed runs (oom, timeout, error, cancelled) stay on every chart as marked placeholders with
their status: silently dropping the OOM of a sweep would hide the most important result.
"""
from __future__ import annotations

import math
from collections import Counter
from typing import Callable

import plotly.graph_objects as go

from engine import presets
from engine.config import DESCRIBED_FIELDS, FIELD_NAMES, FIELDS_BY_NAME, GIB, gib_words
from engine.results import BREAKDOWN_KEYS, Result

from .common import (OFF_SCALE_FACTOR, above_chart, add_failed_placeholders, chart_text, ckpt_pattern, describe,
                     error_bars, failed_hover, layout, limit_line, precision_color)

THROUGHPUT_TITLE = "Throughput"
PEAK_MEMORY_TITLE = "Peak memory"
BACKWARD_TITLE = "Backward time"
PHASE_TITLE = "Phase breakdown"
MEMORY_BREAKDOWN_TITLE = "Memory breakdown"
PHASES = (("forward_ms", "forward"), ("backward_ms", "backward"), ("optimizer_ms", "optimizer"))

# Fields that can tell runs apart, in label order; "overrides" stands for every model
# dimension any of the runs overrides (seq_len, d_model...); the described fields (optimizer,
# attention...) come from their declaration, with their words.
LABEL_FIELDS = ("model", "overrides", "batch", "accum", "precision", "ckpt", *(f.name for f in DESCRIBED_FIELDS),
                "memory_cap_gib", "device")
# Sweep charts may also use the effective batch (a fixed-effective-batch sweep varies it not at
# all, a batch sweep varies it with batch); labels never need it: batch and accum say it.
CHART_AXES = LABEL_FIELDS[:4] + ("effective_batch",) + LABEL_FIELDS[4:]
_FIELD_FORMATS = {
    "batch": "b{}",
    "accum": "accum {}",
    "ckpt": "ckpt {}",
    "model": "{}",
    "precision": "{}",
    "device": "{}",
}


# --------------------------------------------------------------------------- run fields
def field_value(result: Result, field: str):
    """A run's value of a config field, a model dimension (``seq_len``...), ``effective_batch``
    or ``device`` (the device's name); a dimension the run did not override is the preset's value."""
    config = result.config
    if field == "device":
        return result.env.label
    if field == "effective_batch":
        return result.metrics.effective_batch
    if field == "ckpt" and config.ckpt == "every-k":
        return f"every-{config.k}"
    if field in FIELD_NAMES:
        return getattr(config, field)
    if field in config.overrides:
        return config.overrides[field]
    return presets.accepted_dimensions(config.model).get(field)  # None where the model has no such dimension


def _field_text(result: Result, field: str) -> str:
    """A run's value of ``field`` in words, as labels show it ("b4", "bf16", "seq_len 256")."""
    value = field_value(result, field)
    if field == "memory_cap_gib":
        return f"cap {value:g} GiB" if value else "no cap"
    if field in FIELDS_BY_NAME and FIELDS_BY_NAME[field].spec.words:
        return FIELDS_BY_NAME[field].words(value)
    return _FIELD_FORMATS.get(field, field + " {}").format(value)


def field_words(field: str) -> str:
    """What a sweep chart's x axis shows, in words: a config field's label and name
    ("Micro-batch size (batch)"), the effective batch, or a model dimension ("seq_len (model
    dimension)"), which a sweep varies like any field."""
    if field == "effective_batch":
        return "Effective batch (batch × accum)"
    if field in FIELDS_BY_NAME:
        return f"{FIELDS_BY_NAME[field].spec.label} ({field})"
    return f"{field} (model dimension)"


def varying_fields(results: list[Result], fields: tuple[str, ...] = LABEL_FIELDS) -> list[str]:
    """Those of ``fields`` whose value differs between the given runs (what a sweep swept);
    "overrides" expands to the model dimensions any run overrides."""
    dims = sorted({k for r in results for k in r.config.overrides})
    candidates = [d for f in fields for d in (dims if f == "overrides" else [f])]
    return [f for f in candidates if len({repr(field_value(r, f)) for r in results}) > 1]


def run_labels(results: list[Result], with_model: bool = True) -> list[str]:
    """One short, unique label per run built from the fields that differ between runs.

    A sweep over batch × precision reads "gpt-tiny · b4 · bf16": the model (unless
    ``with_model`` is False: a chart names a shared model once, in its axis title), then only
    what differs; identical configs (repeats, or a teammate's run of the same settings) get
    the first characters of their id so no two share a label.
    """
    fields = varying_fields(results) or ["batch", "precision", "ckpt"]
    # The model is always named: a label read on its own (a picker, a diff) says what ran.
    if with_model and "model" not in fields:
        fields = ["model", *fields]
    labels = [" · ".join(_field_text(r, f) for f in fields) for r in results]
    counts = Counter(labels)
    labels = [f"{label} #{r.id[:6]}" if counts[label] > 1 else label for label, r in zip(labels, results)]
    # A noisy run says so wherever it is named, so its bar is not read as a steady figure.
    return [f"{label} (noisy)" if r.ok and r.noisy else label for label, r in zip(labels, results)]


def environment_names(results: list[Result]) -> dict[str, str]:
    """A short name for each environment among ``results`` (keyed by ``environment_id``): the
    device, where the runs come from when they do not all come from the same place, and the
    environment's id when two would still read the same."""
    mixed_origins = len({r.origin for r in results}) > 1
    names: dict[str, str] = {}
    for r in results:
        names.setdefault(r.environment_id, r.env.label + (f" · {r.origin_words}" if mixed_origins else ""))
    counts = Counter(names.values())
    return {key: f"{name} [{key}]" if counts[name] > 1 else name for key, name in names.items()}


def shared_model(results: list[Result]) -> str | None:
    """The model every run trained, or None when they differ (or there are none)."""
    models = {r.config.model_label for r in results}
    return next(iter(models)) if len(models) == 1 else None


def chart_labels(results: list[Result]) -> list[str]:
    """``run_labels`` escaped for a figure (they hold model and device names from files); a
    model every run shares is left out of them and named once, in the x-axis title."""
    return [chart_text(label) for label in run_labels(results, with_model=shared_model(results) is None)]


def _summary(result: Result, key: str) -> tuple[float, float, float] | None:
    summary = result.metrics.phase(key)
    return None if summary is None else (summary.median, summary.p10, summary.p90)


def throughput_unit(results: list[Result]) -> str:
    """tokens/s when every successful run has a sequence length, else samples/s."""
    ok = [r for r in results if r.ok]
    return "tokens/s" if ok and all(r.metrics.tokens_per_s is not None for r in ok) else "samples/s"


def throughput(result: Result, unit: str) -> tuple[float, float, float] | None:
    """(value, low, high) of a run's throughput in ``unit``.

    Throughput is effective batch / step time, so its spread comes from the step-time
    percentiles inverted: the p90 (slow) step gives the low end, the p10 step the high end.
    """
    value = result.metrics.tokens_per_s if unit == "tokens/s" else result.metrics.samples_per_s
    step = _summary(result, "step_ms")
    if value is None:
        return None
    if not step or not step[1] or not step[2]:
        return value, value, value
    median, p10, p90 = step
    return value, value * median / p90, value * median / p10


def peak_memory_gib(result: Result) -> tuple[float, None, None] | None:
    """Peak allocated memory in GiB (no spread: it is one number per run)."""
    peak = result.metrics.peak_allocated_bytes
    return None if peak is None else (peak / GIB, None, None)


def backward_ms(result: Result) -> tuple[float, float, float] | None:
    """Median, p10 and p90 of the backward phase per optimizer step, in ms."""
    return _summary(result, "backward_ms")


# --------------------------------------------------------------------------- per-run layout
def _per_run_layout(fig: go.Figure, title: str, unit: str, results: list[Result], categories: list[str],
                    stacked: bool) -> go.Figure:
    """``categories`` in order on a category axis (every one labelled), the model the runs
    share as its title, y from zero; the three main charts' legend (precision and
    checkpointing) goes above the plot, a stacked chart's parts to its right."""
    entries = sum(1 for trace in fig.data if trace.showlegend)
    model = shared_model(results)
    layout(fig, title, y_title=unit, legend="right" if stacked else "above", bottom=20,
           top=60 if stacked else 60 + 22 * ((entries + 1) // 2), showlegend=entries > 0,
           x_title=f"runs of {chart_text(model)}" if model else None,
           barmode="stack" if stacked else "group")
    # Every category keeps its label however narrow the chart: plotly would otherwise skip some.
    fig.update_xaxes(type="category", categoryorder="array", categoryarray=categories, automargin=True,
                     tickmode="linear", dtick=1)
    fig.update_yaxes(rangemode="nonnegative")  # even when every run failed and all that is drawn sits at 0
    return fig


# Drawn as a bar's colour and pattern, so left out of its group's label.
ENCODED_FIELDS = ("precision", "ckpt")


def _style_name(result: Result, environment: str | None) -> str:
    """The legend entry of a run's bar: its precision and checkpointing (its colour and pattern),
    and its environment when the chart holds more than one."""
    ckpt = "" if result.config.ckpt == "none" else f" · ckpt {field_value(result, 'ckpt')}"
    words = result.config.precision + ckpt
    return words if environment is None else f"{words} · {environment}"


def bar_styles(results: list[Result]) -> list[str]:
    """Each run's legend entry (``_style_name``), escaped for a figure."""
    names = environment_names(results)
    mixed = len(names) > 1
    return [chart_text(_style_name(r, names[r.environment_id] if mixed else None)) for r in results]


def group_labels(results: list[Result]) -> list[str]:
    """Each run's group on the x axis: what varies between the runs other than precision and
    checkpointing (the bar's colour and pattern), e.g. "b4" in a batch × precision sweep; the
    model when nothing else varies. Two runs of one style in one group (repeats) get the start
    of their id."""
    fields = [f for f in varying_fields(results) if f not in ENCODED_FIELDS] or ["model"]
    labels = [chart_text(" · ".join(_field_text(r, f) for f in fields)) for r in results]
    styles = bar_styles(results)
    counts = Counter(zip(labels, styles))
    return [f"{label} #{r.id[:6]}" if counts[(label, style)] > 1 else label
            for label, style, r in zip(labels, styles, results)]


def _per_run_bars(results: list[Result], title: str, unit: str, values: Callable[[Result], tuple | None]) -> go.Figure:
    """One bar per run, grouped on the x axis by what varies besides precision and
    checkpointing (``group_labels``: the batch, in a batch sweep), coloured by precision and
    patterned by checkpointing (one trace, and legend entry, per combination). A failed run
    keeps its slot as an empty bar labelled with its status (OOM...), a noisy run's bar says
    "noisy". With runs from more than one environment the entry names it and the other
    environments' bars are outlined, so an H100 run beside a laptop run (or a demo run beside
    this machine's) is visibly another environment."""
    groups, styles = group_labels(results), bar_styles(results)
    first_environment = results[0].environment_id if results else None
    fig = go.Figure()
    traces: dict[str, list[int]] = {}
    for i, result in enumerate(results):
        if not result.ok or values(result) is not None:
            traces.setdefault(styles[i], []).append(i)
    for name, indices in traces.items():
        points = [values(results[i]) if results[i].ok else (0.0, None, None) for i in indices]
        first = results[indices[0]]
        fig.add_bar(
            name=name,
            x=[groups[i] for i in indices],
            y=[p[0] for p in points],
            error_y=error_bars(points),
            text=[results[i].status.upper() if not results[i].ok else "noisy" if results[i].noisy else ""
                  for i in indices],
            textposition="outside", textangle=-90, textfont=dict(size=11), cliponaxis=False,
            constraintext="none",
            marker=dict(color=precision_color(first.config.precision),
                        pattern=dict(shape=ckpt_pattern(first.config.ckpt), fillmode="overlay", fgcolor="white"),
                        line=dict(width=0 if first.environment_id == first_environment else 3, color="black")),
            customdata=[results[i].id for i in indices],
            showlegend=True,
            hovertext=[failed_hover(results[i]) if not results[i].ok else f"{p[0]:.3g} {unit}"
                       for i, p in zip(indices, points)],
            hovertemplate=f"%{{x}} · {name}<br>%{{hovertext}}<extra></extra>",
        )
    return _per_run_layout(fig, title, unit, results, list(dict.fromkeys(groups)), stacked=False)


def measured_steps(results: list[Result]) -> str:
    """How many measured steps the runs' figures rest on, e.g. "10" or "10–20"."""
    steps = sorted({r.config.steps for r in results if r.ok})
    return "" if not steps else str(steps[0]) if len(steps) == 1 else f"{steps[0]}–{steps[-1]}"


def _spread_caption(results: list[Result], what: str) -> str:
    steps = measured_steps(results)
    return f"{what}<br>Error bars: 10th–90th percentile of {steps} measured steps" if steps else what


# --------------------------------------------------------------------------- the three charts
def build_throughput(results: list[Result], unit: str | None = None) -> go.Figure:
    """Throughput per run (tokens/s or samples/s: ``unit``, else the one ``throughput_unit``
    picks) with p10/p90 error bars."""
    unit = unit or throughput_unit(results)
    fig = _per_run_bars(results, THROUGHPUT_TITLE, unit, lambda r: throughput(r, unit))
    return describe(fig, _spread_caption(results, f"Median {unit} per run (higher is better)"))


def capacity_lines(results: list[Result]) -> list[tuple[float, str]]:
    """(GiB, label) of each distinct memory limit: the run's memory cap, else its device
    capacity; labels are escaped for a figure. A limit too large to be a number of bytes (a
    file's cap of 1e300 GiB) has no line."""
    lines: dict[int, str] = {}
    for result in results:
        limit, cap = result.memory_limit_bytes, result.config.memory_cap_gib
        if limit and math.isfinite(limit):
            label = f"memory cap {gib_words(cap * GIB)}" if cap is not None else f"{result.env.label} capacity {gib_words(limit)}"
            lines.setdefault(round(limit), chart_text(label))
    return sorted((nbytes / GIB, label) for nbytes, label in lines.items())


def build_peak_memory(results: list[Result]) -> go.Figure:
    """Peak allocated memory per run in GiB, with the device capacity (or cap) as a line, or
    said in words when it is far above the bars."""
    fig = _per_run_bars(results, PEAK_MEMORY_TITLE, "GiB", peak_memory_gib)
    bars = [p[0] for r in results if r.ok and (p := peak_memory_gib(r))]
    tallest = max(bars, default=0.0)
    lines = capacity_lines(results)
    above = [(gib, label) for gib, label in lines if tallest and gib > OFF_SCALE_FACTOR * tallest]
    for gib, label in lines:
        limit_line(fig, gib, label)
    if above:
        top = max([tallest] + [gib for gib, label in lines if (gib, label) not in above])
        fig.update_yaxes(range=[0, top * 1.25])
    describe(fig, "Peak allocated memory of one training step (lower is better)<br>Dashed: the memory limit")
    for gib, label in above:
        describe(fig, above_chart(label.rsplit(" ", 2)[0], gib))
    return fig


def build_backward_time(results: list[Result]) -> go.Figure:
    """Backward time per optimizer step (median, p10/p90 error bars) in ms."""
    fig = _per_run_bars(results, BACKWARD_TITLE, "ms", backward_ms)
    return describe(fig, _spread_caption(results, "Median backward time per optimizer step (lower is better)"))


MAIN_CHARTS = (build_throughput, build_peak_memory, build_backward_time)


# --------------------------------------------------------------------------- breakdowns
def _stacked(results: list[Result], title: str, unit: str, parts: list[tuple[str, Callable[[Result], float | None]]]) -> go.Figure:
    labels = chart_labels(results)
    ok = [i for i, r in enumerate(results) if r.ok]
    fig = go.Figure()
    for name, value in parts:
        fig.add_bar(
            name=name,
            x=[labels[i] for i in ok],
            y=[value(results[i]) for i in ok],
            showlegend=True,
            hovertemplate=f"%{{x}}<br>{name}: %{{y:.3g}} {unit}<extra></extra>",
        )
    add_failed_placeholders(fig, results, labels, legend=False)
    return _per_run_layout(fig, title, unit, results, labels, stacked=True)


def build_phase_breakdown(results: list[Result]) -> go.Figure:
    """Forward / backward / optimizer medians per run, stacked, in ms per optimizer step."""
    parts = [(name, lambda r, key=key: r.metrics.phase(key).median) for key, name in PHASES]
    return describe(_stacked(results, PHASE_TITLE, "ms", parts),
                    "Median time of each phase per optimizer step, stacked")


def build_memory_breakdown(results: list[Result]) -> go.Figure:
    """Params / grads / optimizer state / activations / other at the peak, stacked, in GiB."""

    def part(key: str) -> Callable[[Result], float | None]:
        def value(result: Result) -> float | None:
            breakdown = result.metrics.memory_breakdown_bytes
            return None if breakdown is None else getattr(breakdown, key) / GIB
        return value

    return describe(_stacked(results, MEMORY_BREAKDOWN_TITLE, "GiB", [(key, part(key)) for key in BREAKDOWN_KEYS]),
                    "What was alive at the peak, measured in one extra step")


# --------------------------------------------------------------------------- sweep lines
# metric name -> (title, unit for given results, value function taking (result, unit))
SWEEP_METRICS: dict[str, tuple[str, Callable[[list[Result]], str], Callable[[Result, str], tuple | None]]] = {
    "throughput": (THROUGHPUT_TITLE, throughput_unit, throughput),
    "peak_memory": (PEAK_MEMORY_TITLE, lambda results: "GiB", lambda r, unit: peak_memory_gib(r)),
    "backward": (BACKWARD_TITLE, lambda results: "ms", lambda r, unit: backward_ms(r)),
    "step": ("Step time", lambda results: "ms", lambda r, unit: _summary(r, "step_ms")),
}


def sweep_fields(results: list[Result]) -> list[str]:
    """Fields a sweep chart can put on its x axis: those that vary between the runs, the
    model dimensions a sweep varied (seq_len...) among them, first the model's."""
    return varying_fields(results, CHART_AXES)


def _determined_by(results: list[Result], field: str, other: str) -> bool:
    """Whether ``other`` is a function of ``field`` over these runs (accum in a fixed-effective-
    batch sweep over batch): splitting lines by it would give one point per line."""
    seen: dict[str, str] = {}
    for result in results:
        x, y = repr(field_value(result, field)), repr(field_value(result, other))
        if seen.setdefault(x, y) != y:
            return False
    return True


def build_sweep_lines(results: list[Result], field: str, metric: str = "throughput") -> go.Figure:
    """``metric`` against the swept ``field`` (a config field or a model dimension such as
    ``seq_len``), one line per combination of the other varied fields, named by their values
    in words ("bf16 · b4").

    Numeric fields (batch, accumulation, seq_len...) go on a log axis because sweeps double
    them; failed runs sit at y = 0 as marked placeholders at their x value.
    """
    title, unit_of, value_of = SWEEP_METRICS[metric]
    unit = unit_of(results)
    others = [f for f in sweep_fields(results) if f != field and not _determined_by(results, field, f)]
    xs = [field_value(r, field) for r in results]
    numeric = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in xs)
    if not numeric:
        xs = [chart_text(x) for x in xs]  # categories, "None" (e.g. no memory cap) included
    groups: dict[str, list[int]] = {}
    for i, result in enumerate(results):
        name = " · ".join(_field_text(result, f) for f in others) or "all runs"
        groups.setdefault(chart_text(name), []).append(i)
    fig = go.Figure()
    for name, members in groups.items():
        ok = [(xs[i], value_of(results[i], unit)) for i in members if results[i].ok]
        ok = [(x, p) for x, p in ok if p is not None]
        if numeric:
            ok.sort(key=lambda item: item[0])
        fig.add_scatter(
            name=name,
            x=[x for x, _ in ok],
            y=[p[0] for _, p in ok],
            error_y=error_bars([p for _, p in ok]),
            mode="lines+markers",
            hovertemplate=f"{chart_text(field)}=%{{x}}<br>%{{y:.3g}} {unit}<extra>%{{fullData.name}}</extra>",
        )
    add_failed_placeholders(fig, results, xs)
    layout(fig, f"{title} vs {chart_text(field)}", x_title=chart_text(field_words(field)), y_title=unit,
           yaxis_rangemode="nonnegative")
    describe(fig, "One line per combination of the other settings; error bars: 10th–90th percentile of the steps")
    if numeric:
        ticks = sorted(set(xs))
        fig.update_xaxes(type="log", tickvals=ticks, ticktext=[f"{t:g}" for t in ticks])
    else:
        fig.update_xaxes(type="category")
    return fig
