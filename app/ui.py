"""Streamlit pieces the pages share: presentation mode, chart display, environment notes,
plain-text messages."""
from __future__ import annotations

import re
from collections import Counter

import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from engine.results import Result

from .charts.common import presentation_layout
from .charts.runs import MAIN_CHARTS, run_labels, throughput_unit

PRESENTATION_KEY = "presentation"
# Below this width three charts side by side drop tick labels: they stack, one per row (the
# columns holding charts only; forms keep theirs).
_NARROW_CSS = """<style>
@media (max-width: 1000px) {
  [data-testid="stHorizontalBlock"]:has(.stPlotlyChart) { flex-direction: column; }
  [data-testid="stHorizontalBlock"]:has(.stPlotlyChart) > [data-testid="stColumn"] { width: 100% !important; flex: 1 1 100% !important; }
}
</style>"""
# Bigger type everywhere for a projector (controls and tables too), less empty space above the
# page, so the three main charts fit a 1280×720 projector; plotly figures are scaled separately.
_PRESENTATION_CSS = """<style>
.stMarkdown p, .stMarkdown li, [data-testid="stWidgetLabel"] p, [data-testid="stMetricLabel"] p,
[data-testid="stCaptionContainer"], .stButton button p, [data-baseweb="select"] div, .stAlert p { font-size: 1.3rem; }
[data-testid="stDataFrame"] { font-size: 1.2rem; }
[data-testid="stMetricValue"], [data-testid="stMetricValue"] p { font-size: 3rem; }
.block-container, [data-testid="stMainBlockContainer"] { padding-top: 2.5rem !important; padding-bottom: 1rem !important; }
h1 { font-size: 2.4rem !important; padding: 0 !important; } h2 { font-size: 2.1rem !important; } h3 { font-size: 1.8rem !important; }
</style>"""
# A chart's height when presenting: three of them, their titles and the page title fit 720 px.
PRESENTATION_CHART_HEIGHT = 430
# Every character Markdown (and Streamlit's :color[...] / :icon: directives, LaTeX, HTML
# entities, setext headings) gives a meaning.
_MARKDOWN = re.compile(r"([\\`*_{}\[\]()<>#+\-.!|~:$&=^])")
# GitHub-flavoured Markdown also links bare addresses (https://..., www...., name@host.tld),
# and it finds them in the text after escapes are undone, so no escape stops it. Each needs a
# dot in its host: a word joiner (U+2060, invisible) before every dot of a text holding one
# leaves nothing to link.
_AUTOLINK = re.compile(r"https?:|www\.|@", re.IGNORECASE)
_WORD_JOINER = "\u2060"


def presenting() -> bool:
    """Whether presentation mode (larger fonts and charts, sidebar collapsed) is on."""
    return bool(st.session_state.get(PRESENTATION_KEY, False))


def apply_presentation_css() -> None:
    """Stack charts on narrow screens; enlarge the page's fonts when presenting."""
    st.html(_NARROW_CSS + (_PRESENTATION_CSS if presenting() else ""))


def plain(text) -> str:
    """``text`` (or ``str(text)``) for Streamlit's Markdown, shown as written: every string
    that came from a file, a link, a model or this machine (device names, errors, warnings,
    file names, quoted values) goes through here, so none can draw an image, a link or
    formatting, or make the browser fetch anything."""
    text = str(text)
    escaped = _MARKDOWN.sub(r"\\\1", text)
    return escaped.replace("\\.", _WORD_JOINER + "\\.") if _AUTOLINK.search(text) else escaped


def show_chart(fig: go.Figure, key: str, large: bool = False) -> None:
    """Draw a figure, its fonts enlarged when presenting (at a height that fits a projector)
    or when ``large`` (a talk's slide)."""
    shown = presentation_layout(fig, height=PRESENTATION_CHART_HEIGHT) if presenting() or large else fig
    st.plotly_chart(shown, key=key, config={"displaylogo": False})


def throughput_unit_choice(results: list[Result], key: str) -> str:
    """tokens/s or samples/s for every chart and number of a view: tokens/s for sequence models
    (switchable to samples/s), samples/s when a run has no sequence length."""
    natural = throughput_unit(results)
    if natural == "samples/s":
        return natural
    st.session_state.setdefault(key, natural)
    return st.segmented_control("Throughput in", ["tokens/s", "samples/s"], key=key, required=True)


def three_charts(results: list[Result], key: str, unit: str | None = None) -> None:
    """Throughput (in ``unit``), Peak memory and Backward time side by side."""
    for column, build in zip(st.columns(3), MAIN_CHARTS):
        with column:
            fig = build(results, unit) if build is MAIN_CHARTS[0] else build(results)
            show_chart(fig, key=f"{key}.{build.__name__}")


def environment_note(results: list[Result]) -> None:
    """Say which environment (device, versions, origin) measured these runs; warn when they
    differ, so an H100 run is not read as a laptop run, nor a demo run as this machine's."""
    environments = sorted({r.environment_words for r in results})
    if len(environments) > 1:
        st.warning(f"These runs come from {len(environments)} different environments: "
                   + "; ".join(plain(words) for words in environments)
                   + ". Bars are coloured by environment; compare like with like.")
    elif environments:
        st.caption(f"Measured on: {plain(environments[0])}")


def noisy_runs_note(results: list[Result]) -> None:
    """Name the runs whose step time varied past the noise threshold; their labels say "(noisy)"."""
    noisy = [(label, r) for label, r in zip(run_labels(results), results) if r.ok and r.noisy]
    if noisy:
        st.warning(f"{len(noisy)} run(s) are noisy: "
                   + "; ".join(plain(f"{label}: {r.metrics.step_ms.noise_words('step time')}") for label, r in noisy)
                   + ". Their differences may be noise: measure them again with more steps, on a quieter machine.")


def failed_runs_note(results: list[Result]) -> None:
    """List failed runs with their status and error; the charts mark them but cannot say why.
    One table however many failed (a sweep may hold hundreds of OOMs), its cells plain text."""
    failed = [r for r in results if not r.ok]
    if not failed:
        return
    labels = dict(zip((r.id for r in results), run_labels(results)))
    statuses = Counter(r.status.upper() for r in failed)
    with st.expander(f"{len(failed)} run(s) did not finish: "
                     + ", ".join(f"{count} {status}" for status, count in statuses.most_common())):
        st.dataframe(pd.DataFrame([{"run": labels[r.id], "status": r.status.upper(), "device": r.env.label,
                                    "error": r.error or "(no message)"} for r in failed]),
                     hide_index=True, column_config={"error": st.column_config.TextColumn(width="large")})
