"""Decide page: from measurements to a configuration (engine/finder, predict, frontier,
timeline, pitfall, numerics).

The sidebar holds the session's one configuration (the shared form, so the Run page's
settings) and the memory margin; each tab asks one question about it. Anything that
measures runs as a background task in the engine's worker processes, which the page
follows, so the page stays responsive; runs it makes are stored like every other run.
"""
from collections import Counter

import pandas as pd
import streamlit as st

from app import form, storage, tables, tasks, ui
from app.charts import decisions
from app.panels import find_batch_panel, gib, numerical_cost_panel, percent
from engine import devices, frontier, limits, pitfall, predict, timeline
from engine.config import CKPT_POLICIES, GIB, PRECISIONS, BenchConfig, ConfigError, check_runnable, device_memory_limit
from engine.devices import resolve_device

store = storage.get_store()


# ---------------------------------------------------------------- the configuration
def sidebar_margin() -> float:
    """The memory margin, the Decide page's own input below the shared form."""
    st.session_state.setdefault("decide.margin", predict.DEFAULT_MARGIN)
    with st.sidebar:
        return float(st.number_input("Memory margin to keep free", min_value=0.0, max_value=0.5, step=0.01,
                                     key="decide.margin", persist_state="session",
                                     help="Headroom for fragmentation and the CUDA context."))


# ---------------------------------------------------------------- tabs
def predict_tab(config: BenchConfig, margin: float) -> None:
    device_type = resolve_device(config.device).split(":")[0]
    points = [(b, p) for b, p, _ in predict.measured_points(store.list(model=config.model), config, device_type,
                                                            devices.this_host_id())]
    left, middle, right = st.columns(3)
    typed = left.text_input("GPU sizes to predict for (GiB)", value="24, 40, 80, 141", key="decide.predict.gib")
    batches = middle.text_input("Batches to measure", value="auto", key="decide.predict.batches",
                                help="auto: double from 1 until the peak grows with the batch; or a list, e.g. 4, 8, 16")
    try:
        sizes = [float(x) for x in typed.split(",") if x.strip()]
        wanted = None if batches.strip() == "auto" else [int(x) for x in batches.split(",") if x.strip()]
        targets = predict.capacities(sizes, device_memory_limit(config), device_type,
                                     capped=config.memory_cap_gib is not None)
        for candidate in predict.missing_configs(config, points, wanted or []):
            limits.check_limits(candidate)  # typed batches: no more than the form allows
    except (ValueError, ConfigError) as exc:
        st.error(f"Invalid input: {ui.plain(exc)}")
        return
    needed = predict.missing_configs(config, points, wanted) if wanted is not None else \
        predict.next_batch_to_measure(points, int(limits.limit_for("batch"))) is not None

    def measure(progress, on_result, cancel):
        return predict.measure_for_fit(config, points, wanted, limit=int(limits.limit_for("batch")),
                                       progress=progress, on_result=on_result, cancel=cancel)

    state = tasks.task_button("decide.predict.task", "Measure for the fit",
                              lambda: tasks.Task("Measuring for the fit", measure, store), where=right,
                              disabled=not needed, type="secondary",
                              help="Runs the batches the fit still needs for this configuration on this device.")
    if state is not None and state.succeeded and state.value[1]:
        st.warning(ui.plain(state.value[1]))
    report = predict.report(points, config, targets, margin)
    if report["fit"] is None:
        st.info(f"{len(points)} measured batch size(s) of this configuration on {ui.plain(device_type)}. No fit: "
                f"{ui.plain(report['fit_problem'])}. (Ok runs are used; the analytic estimate needs none.)")
    else:
        fit = report["fit"]
        left_out = f"; batches {', '.join(map(str, fit['left_out']))} left out: the peak does not grow there" \
            if fit["left_out"] else ""
        st.markdown(f"**Fit:** peak ≈ {gib(fit['fixed_bytes'])} + {gib(fit['slope_bytes'])} × batch "
                    f"(from batches {', '.join(str(b) for b, _ in fit['points'])}{left_out}; "
                    f"largest miss {fit['max_error']:.1%})")
    ui.show_chart(decisions.build_memory_prediction(report), key="decide.predict.chart")
    if report["comparison"]:
        st.markdown("**Measured vs fitted vs analytic** (error = estimate / measured − 1)")
        st.dataframe(pd.DataFrame([{
            "batch": r["batch"], "measured": gib(r["measured_bytes"]), "fitted": gib(r["fitted_bytes"]),
            "fitted error %": percent(r["fitted_error"]), "analytic": gib(r["analytic_bytes"]),
            "analytic error %": percent(r["analytic_error"]),
        } for r in report["comparison"]]), hide_index=True, column_config={
            "fitted error %": st.column_config.NumberColumn(format="%+.2f %%"),
            "analytic error %": st.column_config.NumberColumn(format="%+.2f %%")})
    st.markdown(f"**Largest micro-batch with {margin:.0%} left free**")
    st.dataframe(tables.in_words(report["capacities"], drop=("capacity_bytes",)), hide_index=True)
    if report["analytic"]:
        with st.expander("Analytic estimate at this batch"):
            a = report["analytic"]
            st.dataframe(pd.DataFrame([{"part": k, "size": gib(a[k])} for k in
                                       ("params", "grads", "optimizer", "data_parallel", "inputs", "activations", "transient",
                                        "peak") if a.get(k) or k != "data_parallel"]),
                         hide_index=True)
            for note in a["notes"]:
                st.caption(ui.plain(note))


MIN_BUDGET_GIB, MAX_BUDGET_GIB = 0.001, 1e9


def budget_default(limit_bytes: float | None) -> float:
    """The memory budget a recommendation starts from: the runs' memory limit (cap or device
    capacity, 80 GiB when unknown) in GiB, within the input's bounds: a stored run's cap can
    be any positive number, 1e-300 or 1e300 GiB included."""
    gib_value = (limit_bytes or 80 * GIB) / GIB
    return round(min(max(gib_value, MIN_BUDGET_GIB), MAX_BUDGET_GIB), 3)


def recommend_tab(config: BenchConfig) -> None:
    runs = store.list()
    groups = frontier.groups(runs)
    if not groups:
        st.info("No stored runs yet: run a sweep (Run page) or load the demo data (Results page).")
        return
    here = devices.this_host_id()
    words = {r.environment_id: r.environment_words for r in runs}
    mine = {r.environment_id for r in runs if frontier.measured_here(r, here)}
    # This model's runs measured on this machine first: a decision never mixes environments.
    options = sorted(groups, key=lambda g: (g[0] != config.model_label, g[1] not in mine, -groups[g]))
    left, middle, right = st.columns(3)
    group = left.selectbox("Model and environment", options, key="decide.rec.group",
                           format_func=lambda g: f"{g[0]} · {words[g[1]]} ({groups[g]} runs)")
    selected = frontier.select_runs(runs, *group)
    batches = Counter(r.metrics.effective_batch for r in frontier.measured(selected))
    effective = middle.number_input("Effective batch", min_value=1, step=1, key="decide.rec.effective",
                                    value=batches.most_common(1)[0][0] if batches else 8)
    budget = right.number_input("Memory budget (GiB)", min_value=MIN_BUDGET_GIB, max_value=MAX_BUDGET_GIB,
                                value=budget_default(selected[0].memory_limit_bytes), step=1.0, format="%.3f",
                                key="decide.rec.budget")
    answer = frontier.recommend(selected, int(effective), float(budget))
    (st.success if answer["fits"] else st.warning)(ui.plain(answer["answer"]))
    every_batch = st.toggle("Also chart runs at other effective batches", value=False, key="decide.rec.all")
    shown = selected if every_batch else [r for r in selected if r.metrics.effective_batch == effective or not r.ok]
    ui.show_chart(decisions.build_frontier(shown, frontier.pareto_frontier(shown), answer), key="decide.rec.chart")
    missing = frontier.missing_candidates(selected, int(effective), float(budget))
    try:
        for candidate in missing:
            check_runnable(candidate)
    except ConfigError as exc:  # e.g. a teammate's GPU runs, recommended from on a laptop
        st.caption(f"Missing candidates cannot be measured on this machine: {ui.plain(exc)}")
        return
    st.caption(f"{len(missing)} candidate(s) at effective batch {effective} never measured"
               + (": " + ui.plain("; ".join(c.describe(with_model=False) for c in missing)) if missing else "."))
    tasks.task_button("decide.rec.task", "Measure missing candidates",
                      lambda: tasks.benchmarks("Measuring candidates", missing, store), disabled=not missing,
                      type="secondary", help="Runs the configurations the answer depends on that were never measured.")


OVERLAYS = {"nothing": {}, **{f"checkpointing {c}": {"ckpt": c} for c in CKPT_POLICIES},
            **{f"precision {p}": {"precision": p} for p in PRECISIONS}}


def timeline_tab(config: BenchConfig) -> None:
    left, right = st.columns(2)
    default = "checkpointing full" if config.ckpt != "full" else "checkpointing none"
    overlay = left.selectbox("Overlay a second configuration", list(OVERLAYS), index=list(OVERLAYS).index(default),
                             key="decide.timeline.overlay")
    configs = [config] + ([config.replace(**OVERLAYS[overlay])] if OVERLAYS[overlay] else [])
    state = tasks.task_button("decide.timeline", "Record timeline", lambda: tasks.Task(
        "Recording one step", lambda progress, on_result, cancel: timeline.timelines(configs, progress, cancel), store),
        where=right)
    if state is None or not state.succeeded:
        return
    records = state.value
    ui.show_chart(decisions.build_memory_timeline(records), key="decide.timeline.chart")
    for record in records:
        st.caption(ui.plain(f"{BenchConfig.from_dict(record['config']).describe(with_model=False)}: peak "
                            f"{gib(record['peak_bytes'])} in {record['peak_phase']}; {gib(record['baseline_bytes'])} "
                            f"before the step. {record['source']}."))


def pitfall_tab(config: BenchConfig) -> None:
    st.caption("The same step timed two ways: wall clock around each phase without synchronisation, and the "
               "correct timer (CUDA events, one synchronisation per step).")
    state = tasks.task_button("decide.pitfall", "Time one step both ways", lambda: tasks.Task(
        "Timing", lambda progress, on_result, cancel: pitfall.pitfall(config, progress, cancel), store))
    if state is None or not state.succeeded:
        return
    report = state.value
    ui.show_chart(decisions.build_pitfall(report), key="decide.pitfall.chart")
    (st.warning if report["asynchronous"] else st.info)(ui.plain(report["message"]))


# ---------------------------------------------------------------- page
st.title("Decide")
config = form.config_form()
margin = sidebar_margin()
if config is None:
    st.stop()
# Opened after the form: with an unusable database the form still works and the page says why.
store = storage.get_store()
tabs = st.tabs(["Find batch size", "Predict memory", "Recommend", "Memory timeline", "Timing pitfall", "Numerical cost"])
with tabs[0]:
    find_batch_panel(config, margin, key="decide.find")
with tabs[1]:
    predict_tab(config, margin)
with tabs[2]:
    recommend_tab(config)
with tabs[3]:
    timeline_tab(config)
with tabs[4]:
    pitfall_tab(config)
with tabs[5]:
    runs = store.list(model=config.model, status="ok")
    if runs:
        numerical_cost_panel(runs, runs, key="decide.numerics")
    else:
        st.info(f"No ok runs of {ui.plain(config.model)} stored yet.")
