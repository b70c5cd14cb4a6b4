"""Compare page: chosen runs side by side (three charts, breakdowns, sweep lines, a diff)."""
from collections import Counter

import streamlit as st

from app import storage, ui
from app.charts import runs as run_charts
from app.panels import numerical_cost_panel
from app.tables import diff_runs, runs_frame
from engine.results import Result

HAND_PICKED = "Hand-picked runs"
NEWEST_BY_DEFAULT = 6

st.title("Compare")
runs = storage.get_store().list()
if not runs:
    st.info("No runs stored yet: run a benchmark on the Run page, or import a bundle or the demo data on the Results page.")
    st.stop()

by_id = {r.id: r for r in runs}
sweeps: dict[str, list[Result]] = {}  # newest sweep first, as the store lists runs newest first
for run in runs:
    if run.sweep_id:
        sweeps.setdefault(run.sweep_id, []).append(run)


def describe_sweep(option: str) -> str:
    """A sweep in words: model, what it varied, how many runs, where and when they ran."""
    if option == HAND_PICKED:
        return option
    members = sweeps[option]
    first = members[-1]
    varied = ", ".join(run_charts.varying_fields(members)) or "one setting"
    # A sweep over a model dimension has no one model label: the preset names it.
    model = run_charts.shared_model(members) or first.config.model
    return (f"{model}: sweep over {varied} · {len(members)} runs · {first.env.label} · "
            f"{first.origin_words} · {first.created_at[:16].replace('T', ' ')}")


def run_words(run: Result) -> str:
    """A run in words: when, model and configuration, its status, environment and origin."""
    status = "" if run.ok else f" · {run.status.upper()}"
    return (f"{run.created_at[:16].replace('T', ' ')} · {run.config.describe()}{status} · {run.env.label} "
            f"· {run.origin_words}")


# Two runs that read the same (a repeat of one setting) get the start of their id, only then.
_run_words = {i: run_words(r) for i, r in by_id.items()}
_repeats = Counter(_run_words.values())


def describe_run(run_id: str) -> str:
    words = _run_words[run_id]
    return f"{words} · #{run_id[:6]}" if _repeats[words] > 1 else words


# Runs sent from the Results page ("Compare" on a selection) open as a hand-picked set.
sent = st.session_state.pop("compare.ids", None)
if sent:
    st.session_state["compare.source"] = HAND_PICKED
    st.session_state["compare.runs"] = [i for i in sent if i in by_id]
source = st.selectbox("Runs", list(sweeps) + [HAND_PICKED], format_func=describe_sweep, key="compare.source",
                      help="The latest sweep by default; pick runs by hand to mix sweeps, devices or teammates' runs.")
if source == HAND_PICKED:
    st.session_state["compare.runs"] = [i for i in st.session_state.get("compare.runs", [r.id for r in runs[:NEWEST_BY_DEFAULT]])
                                        if i in by_id]
    ids = st.multiselect("Choose runs", list(by_id), format_func=describe_run, key="compare.runs")
else:
    ids = [r.id for r in sweeps[source]]
selected = sorted((by_id[i] for i in ids), key=lambda r: r.created_at)  # a sweep's own order
if not selected:
    st.info("Choose at least one run.")
    st.stop()

unit = ui.throughput_unit_choice(selected, key="compare.unit")
if ui.presenting():  # the charts first: on a projector they are what the room reads
    ui.three_charts(selected, key="compare", unit=unit)
ui.environment_note(selected)
ui.noisy_runs_note(selected)
ui.failed_runs_note(selected)
if not ui.presenting():
    ui.three_charts(selected, key="compare", unit=unit)

phases, memory = st.columns(2)
with phases:
    ui.show_chart(run_charts.build_phase_breakdown(selected), key="compare.phases")
with memory:
    ui.show_chart(run_charts.build_memory_breakdown(selected), key="compare.memory")

swept = run_charts.sweep_fields(selected)
if swept:
    st.subheader("Sweep")
    field_column, metric_column = st.columns(2)
    field = field_column.selectbox("Against", swept, key="compare.sweep_field", format_func=run_charts.field_words)
    metric = metric_column.selectbox("Metric", list(run_charts.SWEEP_METRICS), key="compare.sweep_metric",
                                     format_func=lambda m: run_charts.SWEEP_METRICS[m][0])
    ui.show_chart(run_charts.build_sweep_lines(selected, field, metric), key="compare.sweep")

st.subheader("Numerical cost and energy")
numerical_cost_panel(selected, runs, key="compare.numerics")

with st.expander("Table of these runs"):
    st.dataframe(runs_frame(selected), hide_index=True)

if len(selected) >= 2:
    st.subheader("Diff of two runs")
    finished = [r for r in selected if r.ok]
    if len(finished) < 2:
        # A run diffed with itself would read as "nothing changed".
        st.info(f"Only {len(finished)} of these runs finished: there is nothing to diff.")
        st.stop()
    labels = dict(zip((r.id for r in selected), run_charts.run_labels(selected)))
    a_column, b_column = st.columns(2)
    # A failed run has no metrics to compare; B never offers A's run. By default the first
    # and last runs that finished.
    options = [r.id for r in finished]
    a = a_column.selectbox("A", options, index=0, format_func=labels.get, key="compare.diff_a")
    others = [i for i in options if i != a]
    b = b_column.selectbox("B", others, index=len(others) - 1, format_func=labels.get, key="compare.diff_b")
    changes, metrics = diff_runs(by_id[a], by_id[b])
    changes_column, metrics_column = st.columns([2, 3])
    with changes_column:
        st.markdown("**What changed** (config and environment)")
        if changes.empty:
            st.caption("Nothing: same config and environment.")
        else:
            st.dataframe(changes, hide_index=True)
    with metrics_column:
        st.markdown("**Every metric**, change = B / A − 1")
        st.dataframe(metrics, hide_index=True,
                     column_config={"change %": st.column_config.NumberColumn(format="%+.1f %%")})
