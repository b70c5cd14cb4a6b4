"""What every figure shares: one layout helper, colours, memory units, error bars, limit lines
and the markers of failed runs."""
from __future__ import annotations

import html

import plotly.graph_objects as go

from engine.config import GIB
from engine.results import Result

CHART_HEIGHT = 440
FAILED_NAME = "failed runs"
FAILED_COLOR = "#d62728"
CAPACITY_COLOR = "#7f7f7f"
FIT_COLOR = "#1f77b4"
ANALYTIC_COLOR = "#ff7f0e"
OK_COLOR = "#2ca02c"
BUDGET_COLOR = "#9467bd"
# A limit line this many times above the tallest value would flatten everything else to
# nothing (a CPU run of a few MiB against the machine's RAM): the axis stops at the data
# instead and a note names the line that is off the scale.
OFF_SCALE_FACTOR = 5.0

# Where a legend goes. Never below a per-run chart, where it would collide with the tilted
# run labels: its devices go above the plot ("above") and a stacked chart's parts to the
# right ("right"); the decision figures, with short axis labels, list theirs below.
LEGENDS = {
    "below": dict(orientation="h", yanchor="top", y=-0.25),
    "right": dict(orientation="v", x=1.02, y=1),
    "above": dict(orientation="v", yanchor="bottom", y=1.02, x=0),
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


def off_scale_note(fig: go.Figure, text: str) -> None:
    """Name limit lines left off the chart, in its top right corner."""
    fig.add_annotation(xref="paper", yref="paper", x=1, y=1, xanchor="right", yanchor="bottom", showarrow=False,
                       text=text, font=dict(color=CAPACITY_COLOR))


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


def presentation_layout(fig: go.Figure, scale: float = 1.5) -> go.Figure:
    """A copy of ``fig`` with fonts and height scaled up for a projector."""
    big = go.Figure(fig)
    size = round(12 * scale)
    big.update_layout(font=dict(size=size), title_font_size=round(17 * scale), legend_font_size=size,
                      height=round((fig.layout.height or CHART_HEIGHT) * scale))
    # Axis fonts are set explicitly: the dashboard's theme template sets them, and a template's
    # axis font wins over the figure-wide one.
    big.update_xaxes(tickfont_size=size, title_font_size=size)
    big.update_yaxes(tickfont_size=size, title_font_size=size)
    return big
