"""Run page: configure a benchmark (or a sweep), run it in the background, see the results.

Settings live in widgets whose state persists for the session; the link-shareable subset is
mirrored into the URL. A click on "Run benchmark" starts a ``jobs.BenchJob`` and returns at
once; a fragment polls the job, and the whole page reruns when a result arrives.
"""
import os
from urllib.parse import urlencode

import streamlit as st

from app import jobs, params, storage, tables, ui
from app.panels import find_batch_panel
from app.charts import throughput_unit
from engine import models, predict, sweep
from engine.config import (CKPT_POLICIES, GIB, OPTIMIZERS, PRECISIONS, BenchConfig, ConfigError, cuda_device_count,
                           mps_available, resolve_device)

POLL_S = 0.5
ALLOW_USER_MODELS = os.environ.get("TRADEOFF_LAB_ALLOW_USER_MODELS") == "1"
# Widget keys are "run.<field>" for these BenchConfig fields (the memory cap widget uses 0 for none).
SETTING_DEFAULTS = {
    **{name: getattr(BenchConfig(), name) for name in ("model", "batch", "accum", "precision", "ckpt", "k", "optimizer",
                                                       "warmup", "steps", "device", "timeout_s", "seed")},
    "memory_cap_gib": 0.0,
}
# Fields a sweep can vary: categorical ones offer their allowed values, numeric ones take a
# comma-separated list; SWEEP_EXAMPLES are the values a newly picked field starts with.
SWEEP_CHOICES = {"batch": None, "accum": None, "precision": PRECISIONS, "ckpt": CKPT_POLICIES, "k": None,
                 "optimizer": OPTIMIZERS}
SWEEP_EXAMPLES = {"batch": "1,2,4,8,16", "accum": "1,2,4", "k": "2,4", "precision": ["fp32", "bf16"],
                  "ckpt": ["none", "full"], "optimizer": ["adamw", "sgd"]}
PERSIST = {"persist_state": "session"}  # keep settings when the user visits another page

store = storage.get_store()


def init_settings() -> None:
    """Once per session: defaults, overridden by valid parameters of the link that opened the app."""
    if "run.initialised" in st.session_state:
        return
    from_link, warnings = params.parse_query_params(st.query_params.to_dict())
    for name, value in {**SETTING_DEFAULTS, **from_link}.items():
        st.session_state[f"run.{name}"] = value
    st.session_state["run.link_warnings"] = warnings
    st.session_state["run.initialised"] = True


def model_dims(model: str) -> dict:
    """Dimension widgets for a preset (in an expander); returns the overrides that differ."""
    family, dims = models.preset_dims(model)
    overrides = {}
    with st.expander("Model dimensions"):
        for name, default in dims.items():
            key = f"run.dim.{model}.{name}"
            st.session_state.setdefault(key, default)
            value = st.number_input(name, min_value=1, step=1, key=key, **PERSIST)
            if value != default:
                overrides[name] = value
        st.caption(f"{family} preset {model}; changed dimensions are sent as overrides.")
    return overrides


def sidebar_settings() -> dict:
    """All BenchConfig fields from the sidebar widgets."""
    with st.sidebar:
        st.header("Benchmark")
        model = st.selectbox("Model", list(models.PRESETS), key="run.model", **PERSIST)
        user_model = ""
        if ALLOW_USER_MODELS:
            user_model = st.text_input("Your model (module:function)", key="run.user_model", **PERSIST,
                                       help="Allowed because TRADEOFF_LAB_ALLOW_USER_MODELS=1. Never taken from a link.")
        overrides = {} if user_model else model_dims(model)
        batch = st.number_input("Micro-batch size", min_value=1, step=1, key="run.batch", **PERSIST)
        accum = st.number_input("Accumulation steps", min_value=1, step=1, key="run.accum", **PERSIST)
        st.caption(f"Effective batch: {batch} × {accum} = **{batch * accum}**")
        precision = st.selectbox("Precision", PRECISIONS, key="run.precision", **PERSIST,
                                 format_func=lambda p: "fp16 (GradScaler)" if p == "fp16" else p)
        ckpt = st.selectbox("Activation checkpointing", CKPT_POLICIES, key="run.ckpt", **PERSIST)
        k = st.number_input("k (checkpoint every k-th block)", min_value=1, step=1, key="run.k",
                            disabled=ckpt != "every-k", **PERSIST)
        optimizer = st.selectbox("Optimizer", OPTIMIZERS, key="run.optimizer", **PERSIST)
        warmup = st.number_input("Warm-up steps (not measured)", min_value=0, step=1, key="run.warmup", **PERSIST)
        steps = st.number_input("Measured steps", min_value=1, step=1, key="run.steps", **PERSIST)
        devices = ["auto", "cpu", *(f"cuda:{i}" for i in range(cuda_device_count()))] + (["mps"] if mps_available() else [])
        device = st.selectbox("Device", devices, key="run.device", **PERSIST,
                              format_func=lambda d: f"auto ({resolve_device('auto')})" if d == "auto" else d)
        cap = st.number_input("Memory cap (GiB, 0 = none)", min_value=0.0, step=0.5, key="run.memory_cap_gib",
                              help="Emulates a smaller device; going over it is an OOM.", **PERSIST)
        timeout = st.number_input("Timeout (s)", min_value=1.0, step=30.0, key="run.timeout_s", **PERSIST)
        seed = st.number_input("Seed", min_value=0, step=1, key="run.seed", **PERSIST)
    return dict(model=user_model or model, overrides=overrides, batch=batch, accum=accum, precision=precision,
                ckpt=ckpt, k=k, optimizer=optimizer, warmup=warmup, steps=steps, device=device,
                memory_cap_gib=cap or None, timeout_s=float(timeout), seed=seed)


def parse_numbers(field: str, text: str) -> list[int]:
    """'1, 2,4' -> [1, 2, 4]; raises ConfigError naming the field."""
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ConfigError(field, text, "comma-separated whole numbers, e.g. 1,2,4") from None


def sweep_settings(base: dict) -> tuple[list[BenchConfig], list[str]]:
    """Sweep definition widgets; the expanded configs and the engine's notes (ConfigError if invalid)."""
    st.session_state.setdefault("run.sweep.fields", ["batch", "precision"])
    fields = st.multiselect("Sweep over", list(SWEEP_CHOICES), key="run.sweep.fields", **PERSIST)
    grid = {}
    for column, field in zip(st.columns(max(len(fields), 1)), fields):
        with column:
            key = f"run.sweep.{field}"
            st.session_state.setdefault(key, SWEEP_EXAMPLES[field])
            if SWEEP_CHOICES[field] is None:
                grid[field] = parse_numbers(field, st.text_input(f"{field} values", key=key, **PERSIST))
            else:
                grid[field] = st.multiselect(f"{field} values", SWEEP_CHOICES[field], key=key, **PERSIST)
    st.session_state.setdefault("run.sweep.effective_batch", 0)
    effective = st.number_input("Fixed effective batch (0 = off): accum = effective batch / batch", min_value=0,
                                step=1, key="run.sweep.effective_batch", **PERSIST)
    if effective:
        base = {name: value for name, value in base.items() if name != "accum"}
    return sweep.expand(base, grid, effective or None)


def key_numbers(result: dict) -> None:
    """The headline numbers of one run (or why it failed)."""
    if result["status"] != "ok":
        st.error(f"{result['status'].upper()}: {result['error']}")
        return
    m = result["metrics"]
    unit = throughput_unit([result])
    value = m["tokens_per_s"] if unit == "tokens/s" else m["samples_per_s"]
    step, backward = m["step_ms"], m["backward_ms"]
    columns = st.columns(5)
    columns[0].metric(f"Throughput ({unit})", f"{value:,.0f}")
    columns[1].metric("Peak memory (GiB)", f"{m['peak_allocated_bytes'] / GIB:.3f}")
    columns[2].metric("Step time (ms)", f"{step['median']:.1f}", help=f"p10 {step['p10']:.1f} ms, p90 {step['p90']:.1f} ms")
    columns[3].metric("Backward time (ms)", f"{backward['median']:.1f}",
                      help=f"p10 {backward['p10']:.1f} ms, p90 {backward['p90']:.1f} ms")
    columns[4].metric("Effective batch", m["effective_batch"])
    if result.get("warnings"):
        st.warning("\n".join(f"- {warning}" for warning in result["warnings"]))


# ---------------------------------------------------------------- settings and link
init_settings()
st.title("Run")
for warning in st.session_state.pop("run.link_warnings", []):  # shown once, on opening the link
    st.warning(warning)
settings = sidebar_settings()
link = params.to_query_params(settings)
if st.query_params.to_dict() != link:
    st.query_params.from_dict(link)

st.session_state.setdefault("run.mode", "Single run")
mode = st.segmented_control("Mode", ["Single run", "Sweep"], required=True, key="run.mode", **PERSIST)
configs, notes, problem = [], [], None
try:
    if mode == "Sweep":
        configs, notes = sweep_settings(settings)
    else:
        configs = [BenchConfig(**settings)]
except ConfigError as exc:
    problem = str(exc)
if problem:
    st.error(f"Invalid setting: {problem}")
for note in notes:
    st.caption(note)
if mode == "Sweep" and configs:
    st.caption(f"{len(configs)} configs, run one after another; failures (e.g. OOM) are recorded and the sweep goes on.")

# ---------------------------------------------------------------- start, follow, cancel
job = st.session_state.get("run.job")
running = job is not None and not job.snapshot().finished
start_column, link_column = st.columns([1, 4])
if start_column.button("Run benchmark", type="primary", disabled=running or not configs or bool(problem)):
    job = jobs.BenchJob(configs, store, as_sweep=mode == "Sweep").start()
    st.session_state["run.job"] = job
with link_column.popover("Copy link", icon=":material/link:"):
    st.code(f"{st.context.url or ''}?{urlencode(link)}", language=None)
    st.caption("Opens the Run page with these settings (" + ", ".join(params.QUERY_FIELDS) + ").")

snapshot = job.snapshot() if job else None
if snapshot:
    st.session_state["run.seen_version"] = snapshot.version


@st.fragment(run_every=POLL_S if snapshot and not snapshot.finished else None)
def job_panel() -> None:
    """Progress of the current job; polled without rerunning the page until a result arrives."""
    current = st.session_state.get("run.job")
    if current is None:
        return
    state = current.snapshot()
    if state.version != st.session_state.get("run.seen_version"):
        st.rerun()  # a run finished: redraw the page with its charts
    if not state.finished:
        st.progress(state.fraction(), text=state.describe())
        if st.button("Cancel", disabled=state.cancelling):
            current.cancel()
            st.rerun(scope="fragment")
    if state.failure:
        st.error(f"The benchmark job failed unexpectedly: {state.failure}")
    if len(state.configs) > 1:
        st.dataframe(tables.queue_frame([c.to_dict() for c in state.configs], list(state.results), state.finished,
                                        state.queue_position is not None), hide_index=True)


job_panel()

if mode == "Single run" and configs:
    with st.expander("Find batch size: the largest micro-batch that fits, and the fastest",
                     expanded="run.find" in st.session_state):
        find_batch_panel(configs[0], predict.DEFAULT_MARGIN, store, key="run.find")

# ---------------------------------------------------------------- newest results
if snapshot and snapshot.results:
    latest = list(snapshot.results)
else:
    newest = store.list(limit=1)
    latest = store.list(sweep_id=newest[0]["sweep_id"]) if newest and newest[0].get("sweep_id") else newest
    latest.sort(key=lambda r: r["created_at"])
if latest:
    st.subheader("Latest results" if snapshot and snapshot.results else "Latest stored results")
    if len(latest) == 1:
        key_numbers(latest[0])
    ui.environment_note(latest)
    ui.failed_runs_note(latest)
    ui.three_charts(latest, key="run")
else:
    st.info("No runs yet. Choose settings in the sidebar and press **Run benchmark**.")
