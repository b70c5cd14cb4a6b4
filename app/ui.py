"""Streamlit pieces the pages share: presentation mode, chart display, environment notes."""
from __future__ import annotations

import plotly.graph_objects as go
import streamlit as st

from . import charts

PRESENTATION_KEY = "presentation"
# Bigger type everywhere for a projector; plotly figures are scaled separately.
_PRESENTATION_CSS = """<style>
.stMarkdown p, .stMarkdown li, [data-testid="stWidgetLabel"] p, [data-testid="stMetricLabel"] p { font-size: 1.35rem; }
[data-testid="stMetricValue"], [data-testid="stMetricValue"] p { font-size: 3.4rem; }
h1 { font-size: 3.2rem !important; } h2 { font-size: 2.4rem !important; } h3 { font-size: 1.9rem !important; }
</style>"""


def presenting() -> bool:
    """Whether presentation mode (larger fonts and charts, sidebar collapsed) is on."""
    return bool(st.session_state.get(PRESENTATION_KEY, False))


def apply_presentation_css() -> None:
    """Enlarge the page's fonts when presenting."""
    if presenting():
        st.html(_PRESENTATION_CSS)


def show_chart(fig: go.Figure, key: str) -> None:
    """Draw a figure, enlarged when presenting."""
    st.plotly_chart(charts.presentation_layout(fig) if presenting() else fig, key=key,
                    config={"displaylogo": False})


def three_charts(results: list[dict], key: str) -> None:
    """Throughput, Peak memory and Backward time side by side."""
    builders = (charts.build_throughput, charts.build_peak_memory, charts.build_backward_time)
    for column, build in zip(st.columns(3), builders):
        with column:
            show_chart(build(results), key=f"{key}.{build.__name__}")


def environment_note(results: list[dict]) -> None:
    """Say which devices measured these runs; warn when they differ, so an H100 run is not
    read as a laptop run (or the other way round)."""
    devices = sorted({charts.device_name(r) for r in results})
    if len(devices) > 1:
        st.warning(f"These runs come from {len(devices)} different devices: {', '.join(devices)}. "
                   "Bars are coloured by device; compare like with like.")
    else:
        st.caption(f"Measured on: {devices[0]}" if devices else "")


def failed_runs_note(results: list[dict]) -> None:
    """List failed runs with their status and error; the charts mark them but cannot say why."""
    failed = [r for r in results if r["status"] != "ok"]
    if not failed:
        return
    labels = dict(zip((r["id"] for r in results), charts.run_labels(results)))
    with st.expander(f"{len(failed)} run(s) did not finish: " + ", ".join(
            f"{labels[r['id']]} ({r['status'].upper()})" for r in failed)):
        for result in failed:
            st.markdown(f"**{labels[result['id']]}** · {result['status'].upper()} · {charts.device_name(result)}")
            st.code(result.get("error") or "(no message)", language=None, wrap_lines=True)
