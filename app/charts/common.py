"""What every figure shares: one layout helper, colours, memory units, error bars, limit lines
and the markers of failed runs."""
from __future__ import annotations

import html

import plotly.graph_objects as go

from engine.config import GIB, gib_words
from engine.results import Result

CHART_HEIGHT = 440
FAILED_NAME = "failed runs"
# Okabe & Ito's colour-blind-safe palette: no red/green pair anywhere (good and bad are blue
# and vermillion), each colour still distinct in greyscale by its lightness.
BLUE, ORANGE, SKY, GREEN, VERMILLION, PURPLE, YELLOW = (
    "#0072B2", "#E69F00", "#56B4E9", "#009E73", "#D55E00", "#CC79A7", "#F0E442")
FAILED_COLOR = VERMILLION
CAPACITY_COLOR = "#7f7f7f"
FIT_COLOR = SKY
ANALYTIC_COLOR = ORANGE
OK_COLOR = BLUE
BUDGET_COLOR = PURPLE
# The one visual encoding of a run on every chart and page: its precision is its colour, its
# checkpointing policy the pattern inside the bar (solid when nothing is recomputed).
PRECISION_COLORS = {"fp32": BLUE, "bf16": ORANGE, "fp16": PURPLE}
CKPT_PATTERNS = {"none": "", "full": "/", "every-k": "x", "selective": ".", "offload": "|"}
# A limit line this many times above the tallest value would flatten everything else to
# nothing (a CPU run of a few MiB against the machine's RAM): the axis stops at the data
# instead and the chart says in words where the line is.
OFF_SCALE_FACTOR = 5.0

# Where a legend goes. Never below a per-run chart, where it would collide with the tilted
# run labels: its devices go above the plot ("above") and a stacked chart's parts to the
# right ("right"); the decision figures, with short axis labels, list theirs below.
LEGENDS = {
    "below": dict(orientation="h", yanchor="top", y=-0.25),
    "right": dict(orientation="v", x=1.02, y=1),
    "above": dict(orientation="h", yanchor="bottom", y=1.02, x=0, entrywidth=0.5, entrywidthmode="fraction"),
}


def layout(fig: go.Figure, title: str, *, x_title: str | None = None, y_title: str | None = None,
           legend: str | None = None, top: int = 60, right: int = 20, bottom: int = 40,
           height: int = CHART_HEIGHT, **extra) -> go.Figure:
    """The layout every figure shares: its title pinned to the top (by default plotly centres
    it in the top margin, which grows with a legend above the plot and would push the title
    into it), axis titles, height, margins and where the legend goes (a ``LEGENDS`` key, or
    plotly's default); ``extra`` goes to ``update_layout`` as is."""
    fig.update_layout(title=dict(text=title, y=0.98, yanchor="top"), height=height,
                      margin=dict(l=50, r=right, t=top, b=bottom), **extra)
    if legend is not None:
        fig.update_layout(legend=LEGENDS[legend])
    if x_title is not None:
        fig.update_layout(xaxis_title=x_title)
    if y_title is not None:
        fig.update_layout(yaxis_title=y_title)
    return fig


def memory_unit(values: list[float]) -> tuple[str, float]:
    """GiB, or MiB when everything is under 1 GiB (tiny CPU runs would read 0.00 GiB)."""
    return ("GiB", GIB) if max(values, default=0) >= GIB else ("MiB", 2**20)


def error_bars(points: list[tuple]) -> dict | None:
    """Asymmetric error bars from (value, low, high) points; None when no point has a spread."""
    if all(p[1] is None for p in points):
        return None
    return dict(
        type="data",
        symmetric=False,
        array=[max(p[2] - p[0], 0.0) if p[2] is not None else 0.0 for p in points],
        arrayminus=[max(p[0] - p[1], 0.0) if p[1] is not None else 0.0 for p in points],
    )


def limit_line(fig: go.Figure, value: float, label: str, color: str = CAPACITY_COLOR) -> None:
    """A dashed horizontal line (a capacity, cap or budget) labelled at its left end."""
    fig.add_hline(y=value, line_dash="dash", line_color=color, annotation_text=label, annotation_position="top left")


def precision_color(precision: str) -> str:
    """The colour of a precision on every chart (grey for one this palette does not know)."""
    return PRECISION_COLORS.get(precision, CAPACITY_COLOR)


def ckpt_pattern(ckpt: str) -> str:
    """The bar pattern of a checkpointing policy on every chart (solid for no checkpointing)."""
    return CKPT_PATTERNS.get(ckpt, "-")


def describe(fig: go.Figure, text: str) -> go.Figure:
    """Say under the title, in one line, what the chart shows (what its bars, error bars and
    lines are, how many steps they rest on); a further line is added after the first."""
    current = fig.layout.title.subtitle.text
    fig.update_layout(title_subtitle_text=f"{current}<br>{text}" if current else text,
                      margin_t=(fig.layout.margin.t or 60) + 22 * (1 + text.count("<br>")))
    return fig


def above_chart(label: str, gib: float) -> str:
    """A limit line too far above the data to draw, in words."""
    return f"{label} {gib_words(gib * GIB)}, above the top of the chart"


def chart_text(text) -> str:
    """Text from a run, a file or this machine (a device name, an error, a model, a label
    built from them) for a figure, drawn as written: plotly draws a subset of HTML in
    titles, legends, hover text, annotations, tick labels and category names (``<a href>``
    becomes a clickable link), so ``&``, ``<`` and ``>`` are escaped to entities it shows
    as the characters."""
    return html.escape(str(text), quote=False)


def failed_hover(result: Result) -> str:
    """Hover text of a failed run: its status, device and (the start of) its error."""
    error = (result.error or "").strip()
    short = error if len(error) <= 160 else error[:157] + "..."
    return f"{result.status.upper()} on {chart_text(result.env.label)}<br>{chart_text(short)}"


def failed_marker() -> dict:
    """The marker of a failed run: a red cross."""
    return dict(symbol="x", size=14, color=FAILED_COLOR, line=dict(width=2))


def add_failed_placeholders(fig: go.Figure, results: list[Result], xs: list, legend: bool = True) -> None:
    """One marked point per failed run at y = 0 with its status (OOM, TIMEOUT...) above it and
    its error in the hover, all in one trace: a figure's size and drawing time stay flat
    however many runs failed (one annotation each made a sweep of 1,000 OOMs take minutes).

    ``legend``: whether the trace has a legend entry (per-run charts, whose legend names
    devices, leave it out: the statuses label the points).
    """
    failed = [i for i, r in enumerate(results) if not r.ok]
    if not failed:
        return
    fig.add_scatter(
        name=FAILED_NAME,
        x=[xs[i] for i in failed],
        y=[0] * len(failed),
        mode="markers+text",
        showlegend=legend,
        marker=failed_marker(),
        text=[results[i].status.upper() for i in failed],
        textposition="top center",
        textfont=dict(color=FAILED_COLOR),
        hovertext=[failed_hover(results[i]) for i in failed],
        hoverinfo="text",
    )


def presentation_layout(fig: go.Figure, scale: float = 1.5, height: int | None = None) -> go.Figure:
    """A copy of ``fig`` with fonts scaled up for a projector, and its height scaled too (or
    set to ``height``, to fit a screen)."""
    big = go.Figure(fig)
    size = round(12 * scale)
    big.update_layout(font=dict(size=size), title_font_size=round(17 * scale), legend_font_size=size,
                      title_subtitle_font_size=round(11 * scale),
                      height=height or round((fig.layout.height or CHART_HEIGHT) * scale),
                      # The title, its subtitle and a legend above the plot grow with the type.
                      margin_t=round((fig.layout.margin.t or 60) * (1 + scale) / 2))
    # Axis fonts are set explicitly: the dashboard's theme template sets them, and a template's
    # axis font wins over the figure-wide one.
    big.update_xaxes(tickfont_size=size, title_font_size=size)
    big.update_yaxes(tickfont_size=size, title_font_size=size)
    return big
