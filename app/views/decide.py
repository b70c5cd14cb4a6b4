"""Decide page: from measurements to a configuration (engine/finder, predict, frontier,
timeline, pitfall, numerics).

The sidebar holds one configuration (initialised from the Run page's settings when they
exist); each tab asks one question about it. Anything that measures runs in the engine's
worker processes from a background thread, which the page polls, so the page stays
responsive; runs it makes are stored like every other run.
"""
from collections import Counter

import pandas as pd
import streamlit as st

from app import charts, jobs, storage, ui
from app.panels import find_batch_panel, gib, numerical_cost_panel, percent
from app.tasks import follow_job, task_button
from engine import frontier, models, pitfall, predict, timeline
from engine.config import (CKPT_POLICIES, GIB, OPTIMIZERS, PRECISIONS, BenchConfig, ConfigError, cuda_device_count,
                           device_capacity_bytes, resolve_device)

DEFAULTS = BenchConfig()
FIELDS = ("model", "batch", "accum", "precision", "ckpt", "k", "optimizer", "warmup", "steps", "device", "timeout_s")
PERSIST = {"persist_state": "session"}

store = storage.get_store()


# ---------------------------------------------------------------- the configuration
def sidebar_config() -> tuple[BenchConfig | None, float]:
    """The configuration and the memory margin from the sidebar; the Run page's settings
    are the defaults when that page was used in this session."""
    for name in FIELDS:
        st.session_state.setdefault(f"decide.{name}", st.session_state.get(f"run.{name}", getattr(DEFAULTS, name)))
    with st.sidebar:
        st.header("Configuration")
        model = st.selectbox("Model", list(models.PRESETS), key="decide.model", **PERSIST)
        overrides = {}
        with st.expander("Model dimensions"):
            for name, default in models.preset_dims(model)[1].items():
                key = f"decide.dim.{model}.{name}"
                st.session_state.setdefault(key, st.session_state.get(f"run.dim.{model}.{name}", default))
                value = st.number_input(name, min_value=1, step=1, key=key, **PERSIST)
                if value != default:
                    overrides[name] = value
        batch = st.number_input("Micro-batch size", min_value=1, step=1, key="decide.batch", **PERSIST)
        accum = st.number_input("Accumulation steps", min_value=1, step=1, key="decide.accum", **PERSIST)
        precision = st.selectbox("Precision", PRECISIONS, key="decide.precision", **PERSIST)
        ckpt = st.selectbox("Activation checkpointing", CKPT_POLICIES, key="decide.ckpt", **PERSIST)
        k = st.number_input("k (every k-th block)", min_value=1, step=1, key="decide.k", disabled=ckpt != "every-k", **PERSIST)
        optimizer = st.selectbox("Optimizer", OPTIMIZERS, key="decide.optimizer", **PERSIST)
        warmup = st.number_input("Warm-up steps", min_value=0, step=1, key="decide.warmup", **PERSIST)
        steps = st.number_input("Measured steps", min_value=1, step=1, key="decide.steps", **PERSIST)
        devices = ["auto", "cpu", *(f"cuda:{i}" for i in range(cuda_device_count()))]
        if st.session_state["decide.device"] not in devices:
            st.session_state["decide.device"] = "auto"
        device = st.selectbox("Device", devices, key="decide.device", **PERSIST)
        timeout = st.number_input("Timeout per run (s)", min_value=1.0, step=30.0, key="decide.timeout_s", **PERSIST)
        st.session_state.setdefault("decide.margin", predict.DEFAULT_MARGIN)
        margin = st.number_input("Memory margin to keep free", min_value=0.0, max_value=0.5, step=0.01,
                                 key="decide.margin", **PERSIST, help="Headroom for fragmentation and the CUDA context.")
    try:
        config = BenchConfig(model=model, overrides=overrides, batch=int(batch), accum=int(accum), precision=precision,
                             ckpt=ckpt, k=int(k), optimizer=optimizer, warmup=int(warmup), steps=int(steps),
                             device=device, timeout_s=float(timeout))
    except ConfigError as exc:
        st.error(f"Invalid setting: {exc}")
        return None, margin
    return config, float(margin)


# ---------------------------------------------------------------- tabs
def predict_tab(config: BenchConfig, margin: float) -> None:
    device = resolve_device(config.device)
    device_type = device.split(":")[0]
    points = [(b, p) for b, p, _ in predict.measured_points(store.list(model=config.model), config, device_type)]
    left, middle, right = st.columns(3)
    typed = left.text_input("GPU sizes to predict for (GiB)", value="24, 40, 80, 141", key="decide.predict.gib")
    batches = middle.text_input("Batches to measure", value="1, 2, 4", key="decide.predict.batches")
    try:
        sizes = [float(x) for x in typed.split(",") if x.strip()]
        wanted = [int(x) for x in batches.split(",") if x.strip()]
        targets = predict.capacities(sizes, device_capacity_bytes(device), device_type)
        configs = [config.replace(batch=b) for b in wanted if b not in {p[0] for p in points}]
    except (ValueError, ConfigError) as exc:
        st.error(f"Invalid input: {exc}")
        return
    running = "decide.predict.job" in st.session_state and not st.session_state["decide.predict.job"].snapshot().finished
    if right.button("Measure these batches", disabled=running or not configs,
                    help="Runs the batches not measured yet for this configuration on this device."):
        st.session_state["decide.predict.job"] = jobs.BenchJob(configs, store, as_sweep=True).start()
        st.rerun()
    follow_job("decide.predict.job")
    report = predict.report(points, config, targets, margin)
    if report["fit"] is None:
        st.info(f"{len(points)} measured batch size(s) of this configuration on {device_type}: the fit needs two. "
                "Measure some batches (ok runs are used; the analytic estimate needs none).")
    else:
        fit = report["fit"]
        st.markdown(f"**Fit:** peak ≈ {gib(fit['fixed_bytes'])} + {gib(fit['slope_bytes'])} × batch")
    ui.show_chart(charts.build_memory_prediction(report), key="decide.predict.chart")
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
    st.dataframe(pd.DataFrame(report["capacities"]).drop(columns=["capacity_bytes"]), hide_index=True)
    if report["analytic"]:
        with st.expander("Analytic estimate at this batch"):
            a = report["analytic"]
            st.dataframe(pd.DataFrame([{"part": k, "size": gib(a[k])} for k in
                                       ("params", "grads", "optimizer", "inputs", "activations", "transient", "peak")]),
                         hide_index=True)
            for note in a["notes"]:
                st.caption(note)


def recommend_tab(config: BenchConfig) -> None:
    runs = store.list()
    groups = frontier.groups(runs)
    if not groups:
        st.info("No stored runs yet: run a sweep (Run page) or load the demo data (Results page).")
        return
    options = sorted(groups, key=lambda g: (g[0] != config.model, -groups[g]))
    left, middle, right = st.columns(3)
    group = left.selectbox("Model and device", options, key="decide.rec.group",
                           format_func=lambda g: f"{g[0]} on {g[1]} ({groups[g]} runs)")
    selected = [r for r in runs if (frontier.model_label(r["config"]), frontier.device_label(r)) == group]
    batches = Counter(r["metrics"]["effective_batch"] for r in frontier.measured(selected))
    effective = middle.number_input("Effective batch", min_value=1, step=1, key="decide.rec.effective",
                                    value=batches.most_common(1)[0][0] if batches else 8)
    capacity = frontier.capacity_bytes(selected[0]) or 80 * GIB
    budget = right.number_input("Memory budget (GiB)", min_value=0.001, value=round(capacity / GIB, 3), step=1.0,
                                format="%.3f", key="decide.rec.budget")
    answer = frontier.recommend(selected, int(effective), float(budget))
    (st.success if answer["fits"] else st.warning)(answer["answer"])
    only_batch = st.toggle("Chart only runs at this effective batch", value=False, key="decide.rec.only")
    shown = [r for r in selected if r["metrics"].get("effective_batch") == effective] if only_batch else selected
    ui.show_chart(charts.build_frontier(shown, answer), key="decide.rec.chart")
    try:
        missing = frontier.missing_candidates(selected, int(effective), float(budget))
    except ConfigError as exc:
        st.caption(f"Missing candidates cannot be measured on this machine: {exc}")
        return
    running = "decide.rec.job" in st.session_state and not st.session_state["decide.rec.job"].snapshot().finished
    st.caption(f"{len(missing)} candidate(s) at effective batch {effective} never measured"
               + (": " + "; ".join(frontier.config_words(c.to_dict()) for c in missing) if missing else "."))
    if st.button("Measure missing candidates", disabled=running or not missing,
                 help="Runs the configurations the answer depends on that were never measured."):
        st.session_state["decide.rec.job"] = jobs.BenchJob(missing, store, as_sweep=True).start()
        st.rerun()
    follow_job("decide.rec.job")


OVERLAYS = {"nothing": {}, **{f"checkpointing {c}": {"ckpt": c} for c in CKPT_POLICIES},
            **{f"precision {p}": {"precision": p} for p in PRECISIONS}}


def timeline_tab(config: BenchConfig) -> None:
    left, right = st.columns(2)
    default = "checkpointing full" if config.ckpt != "full" else "checkpointing none"
    overlay = left.selectbox("Overlay a second configuration", list(OVERLAYS), index=list(OVERLAYS).index(default),
                             key="decide.timeline.overlay")
    configs = [config] + ([config.replace(**OVERLAYS[overlay])] if OVERLAYS[overlay] else [])
    task = task_button("decide.timeline", "Record timeline",
                       lambda progress, cancel: timeline.timelines(configs, cancel=cancel), "Recording one step",
                       where=right)
    if task is None:
        return
    records = task.value
    ui.show_chart(charts.build_memory_timeline(records), key="decide.timeline.chart")
    for record in records:
        st.caption(f"{frontier.config_words(record['config'])}: peak {gib(record['peak_bytes'])} in "
                   f"{record['peak_phase']}; {gib(record['baseline_bytes'])} before the step. {record['source']}.")


def pitfall_tab(config: BenchConfig) -> None:
    st.caption("The same step timed two ways: wall clock around each phase without synchronisation, and the "
               "correct timer (CUDA events, one synchronisation per step).")
    task = task_button("decide.pitfall", "Time one step both ways",
                       lambda progress, cancel: pitfall.pitfall(config, cancel=cancel), "Timing")
    if task is None:
        return
    report = task.value
    ui.show_chart(charts.build_pitfall(report), key="decide.pitfall.chart")
    (st.warning if report["asynchronous"] else st.info)(report["message"])


# ---------------------------------------------------------------- page
st.title("Decide")
config, margin = sidebar_config()
if config is None:
    st.stop()
tabs = st.tabs(["Find batch size", "Predict memory", "Recommend", "Memory timeline", "Timing pitfall", "Numerical cost"])
with tabs[0]:
    find_batch_panel(config, margin, store, key="decide.find")
with tabs[1]:
    predict_tab(config, margin)
with tabs[2]:
    recommend_tab(config)
with tabs[3]:
    timeline_tab(config)
with tabs[4]:
    pitfall_tab(config)
with tabs[5]:
    runs = [r for r in store.list(model=config.model) if r["status"] == "ok"]
    if runs:
        numerical_cost_panel(runs, key="decide.numerics")
    else:
        st.info(f"No ok runs of {config.model} stored yet.")
