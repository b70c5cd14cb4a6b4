"""Run page: configure a benchmark (or a sweep), run it in the background, see the results.

The configuration is the shared sidebar form (app/form.py), mirrored into the URL so the
page's link reopens it. "Run benchmark" starts a background task (app/tasks.py) and returns
at once; its follower shows the progress, and the whole page reruns when a result arrives.
"""
import json
from urllib.parse import urlencode

import streamlit as st

from app import form, params, storage, tasks, ui
from app.panels import find_batch_panel
from engine import devices, expect, limits, predict, presets, sweep
from engine.config import FIELDS_BY_NAME, GIB, BenchConfig, ConfigError, ConfigField, parse_override_values, sweep_values
from engine.results import Result

PERSIST = form.PERSIST
TASK = "run.task"


def parse_values(field: ConfigField, text: str) -> list:
    """'1, 2,4' -> [1, 2, 4] for ``field``; raises ConfigError naming the field."""
    try:
        return [field.parse(part) for part in text.split(",") if part.strip()]
    except ConfigError:
        raise ConfigError(field.name, text, f"comma-separated values, each {field.allowed()}, "
                                            f"e.g. {field.spec.sweep}") from None


def sweep_from_link() -> None:
    """Once per session: a link's sweep definition (``params.parse_sweep_params``, model
    dimensions of the link's model included) opens the page in Sweep mode with its axes and
    values; invalid parts are named and left out."""
    if "run.link_read" in st.session_state:
        return
    st.session_state["run.link_read"] = True
    query = st.query_params.to_dict()
    model = params.parse_query_params(query)[0].get("model", FIELDS_BY_NAME["model"].default)
    grid, effective, warnings = params.parse_sweep_params(query, model)
    for warning in warnings:
        st.warning(ui.plain(warning))
    if grid is None:
        return
    st.session_state["run.mode"] = "Sweep"
    st.session_state["run.sweep.fields"] = list(grid)
    for name, values in grid.items():
        field = FIELDS_BY_NAME.get(name)
        st.session_state[sweep_key(name)] = values if field and field.choices else \
            ",".join(field.format(v) if field else str(v) for v in values)
    st.session_state["run.sweep.effective_batch"] = effective


def sweep_key(axis: str) -> str:
    """The session key of sweep axis ``axis``'s values (``run.sweep.batch``, ``run.sweep.overrides.seq_len``)."""
    return f"run.sweep.{axis}"


def axis_words(axis: str) -> str:
    """A sweep axis as the picker shows it: a field by its name, a model dimension by its key
    and what it is."""
    dimension = sweep.axis_dimension(axis)
    return axis if dimension is None else f"{dimension} (model dimension)"


def dimension_values(key: str, text: str) -> list[int]:
    """'128, 256' -> [128, 256] for model dimension ``key``, blank parts skipped as for a
    field's list; a bad value raises ConfigError naming the key and that value."""
    return parse_override_values(key, ",".join(part for part in text.split(",") if part.strip()))


def dimension_start(config: BenchConfig, key: str) -> str:
    """The values a newly picked model dimension axis starts with: the model's value and its double."""
    value = {**presets.accepted_dimensions(config.model), **config.overrides}[key]
    return f"{value},{2 * value}"


def sweep_settings(config: BenchConfig) -> tuple[list[BenchConfig], list[str], dict]:
    """Sweep definition widgets: the config fields declared as sweep axes and the model
    dimensions of the chosen model; the expanded configs, the engine's notes and the
    definition's link parameters (ConfigError if invalid, too large, or if a config asks for
    more than this server's limits)."""
    axes = params.sweep_axes(config.model)
    st.session_state.setdefault("run.sweep.fields", ["batch", "precision"])
    # Another model's dimensions are not axes of this one (and a multiselect refuses a value
    # it does not offer).
    st.session_state["run.sweep.fields"] = [name for name in st.session_state["run.sweep.fields"] if name in axes]
    names = st.multiselect("Sweep over", axes, key="run.sweep.fields", format_func=axis_words, **PERSIST)
    grid = {}
    for column, name in zip(st.columns(max(len(names), 1)), names):
        key, dimension = sweep_key(name), sweep.axis_dimension(name)
        if dimension is not None:
            st.session_state.setdefault(key, dimension_start(config, dimension))
            with column:
                grid[name] = dimension_values(dimension, st.text_input(f"{dimension} values", key=key, **PERSIST))
            continue
        field = FIELDS_BY_NAME[name]
        st.session_state.setdefault(key, sweep_values(field) if field.choices else field.spec.sweep)
        with column:
            if field.choices:
                grid[name] = st.multiselect(f"{name} values", field.choices, key=key, **PERSIST,
                                            format_func=lambda c, words=field.spec.choice_words: words.get(c, c))
            else:
                grid[name] = parse_values(field, st.text_input(f"{name} values", key=key, **PERSIST))
    st.session_state.setdefault("run.sweep.effective_batch", 0)
    effective = st.number_input("Fixed effective batch (0 = off): accum = effective batch / batch", min_value=0,
                                step=1, key="run.sweep.effective_batch", **PERSIST)
    base = config.to_dict()
    if effective:
        del base["accum"]
    configs, notes = sweep.expand(base, grid, effective or None)
    for candidate in configs:  # typed values, and the accumulation a fixed effective batch derives
        limits.check_limits(candidate)
    return configs, notes, params.sweep_to_query_params(grid, effective)


def _shown(value, spec: str) -> str:
    """A metric's value formatted, "–" where the run did not measure it (null)."""
    return "–" if value is None else format(value, spec)


def _phase_metric(column, label: str, summary) -> None:
    column.metric(label, _shown(summary and summary.median, ".1f"),
                  help=summary and f"p10 {summary.p10:.1f} ms, p90 {summary.p90:.1f} ms")


def key_numbers(result: Result, unit: str) -> None:
    """The headline numbers of one run (or why it failed); "–" for a metric it lacks."""
    if not result.ok:
        st.error(f"{result.status.upper()}: {ui.plain(result.error or '(no message)')}")
        return
    m = result.metrics
    peak = m.peak_allocated_bytes
    columns = st.columns(5)
    columns[0].metric(f"Throughput ({unit})", _shown(m.tokens_per_s if unit == "tokens/s" else m.samples_per_s, ",.3g"))
    columns[1].metric("Peak memory (GiB)", _shown(None if peak is None else peak / GIB, ".3g"))
    _phase_metric(columns[2], "Step time (ms)", m.step_ms)
    _phase_metric(columns[3], "Backward time (ms)", m.backward_ms)
    columns[4].metric("Effective batch", m.effective_batch)
    if result.warnings:
        st.warning("\n".join(f"- {ui.plain(warning)}" for warning in result.warnings))


def stored_for(configs: list[BenchConfig], stored: list[Result]) -> list[Result]:
    """The newest of the ``stored`` runs (newest first) of each of ``configs`` (these settings
    exactly), in their order: the page never shows an unrelated run as if it were these
    settings' result."""
    def key(config: BenchConfig) -> str:
        return json.dumps(config.to_dict(), sort_keys=True)

    wanted = {key(c) for c in configs}
    newest: dict[str, Result] = {}
    for result in stored:
        if (k := key(result.config)) in wanted:
            newest.setdefault(k, result)
    return [newest[key(c)] for c in configs if key(c) in newest]


def shown_results(results: list[Result], fresh: bool) -> None:
    """Key numbers (one run) and the three charts of ``results``; a cancelled run said plainly."""
    cancelled = [r for r in results if r.status == "cancelled"]
    finished = [r for r in results if r.status != "cancelled"]
    if cancelled:
        st.info(f"Cancelled: {len(cancelled)} run(s) stopped before they finished; nothing of them was measured."
                + (f" {len(finished)} run(s) finished before that." if finished else ""))
    if not finished:
        return
    st.subheader("Latest results" if fresh else "Stored results of these settings")
    unit = ui.throughput_unit_choice(finished, key="run.unit")
    if len(finished) == 1:
        key_numbers(finished[0], unit)
    ui.environment_note(finished)
    ui.failed_runs_note(finished)
    ui.three_charts(finished, key="run", unit=unit)


QUESTION = ("What do batch size, gradient accumulation, mixed precision and activation checkpointing cost and "
            "save on your model, on this machine? Tradeoff Lab measures real training steps and shows you.")


def first_minute(stored: list[Result] | None) -> None:
    """The one-sentence answer of what the tool is for; with nothing stored yet (``stored``:
    the stored runs, None when the database is unusable), the three steps and the demo data
    (real runs, for a machine without a GPU)."""
    st.markdown(QUESTION)
    if stored is None or stored:
        return
    steps, demo = st.columns([3, 1])
    steps.markdown("1. **Pick a configuration** in the sidebar: model, batch, accumulation, precision, checkpointing\n"
                   "2. Press **Run benchmark** (or a sweep of several)\n"
                   "3. **Compare and decide** on the Compare and Decide pages")
    if demo.button("Load demo data", icon=":material/dataset:",
                   help="Real runs of gpt-tiny (batch × precision × checkpointing) recorded on a CPU: "
                        "explore every page without measuring anything."):
        for outcome in storage.load_demo(storage.get_store()):
            (st.error if outcome.error else st.success)(ui.plain(outcome.message()))
        st.switch_page("views/compare.py")


# ---------------------------------------------------------------- settings and link
st.title("Run")
stored = None  # stays None when the database is unusable: said once, and the form still works
with storage.database_errors_shown():
    stored = storage.get_store().list()
first_minute(stored)
sweep_from_link()
config = form.config_form()
if config and form.from_shared_link(config):
    st.info("Settings from a shared link. Below: the stored results of exactly these settings, or \"not run yet\".")
if config:
    expectation = expect.expect(config, stored or [], devices.this_host_id())
    st.caption(ui.plain(expectation.words()))
    for warning in expectation.warnings():
        st.warning(ui.plain(warning))

st.session_state.setdefault("run.mode", "Single run")
mode = st.segmented_control("Mode", ["Single run", "Sweep"], required=True, key="run.mode", **PERSIST)
configs, notes, sweep_link = [], [], {}
if config:
    try:
        configs, notes, sweep_link = sweep_settings(config) if mode == "Sweep" else ([config], [], {})
    except ConfigError as exc:
        st.error(f"Invalid setting: {ui.plain(exc)}")
# The link reproduces the whole benchmark: every setting, each changed dimension, the sweep.
link = form.link(config) | sweep_link if config else {}
if config and st.query_params.to_dict() != link:
    st.query_params.from_dict(link)
for note in notes:
    st.caption(ui.plain(note))
if mode == "Sweep" and configs:
    st.caption(f"{len(configs)} configs, run one after another; failures (e.g. OOM) are recorded and the sweep goes on.")

# ---------------------------------------------------------------- start, follow, cancel
start_column, link_column = st.columns([1, 4])
with link_column.popover("Copy link", icon=":material/link:", disabled=not link):
    st.code(f"{st.context.url or ''}?{urlencode(link)}", language=None)
    st.caption("Opens the Run page with these settings: every setting, each changed model dimension and, "
               "in Sweep mode, the sweep.")
as_sweep = mode == "Sweep"
# The store is opened when a run starts, not before: a page whose database is unusable still
# draws its form, and the click says why it cannot store a run instead of measuring one.
state = tasks.task_button(TASK, "Run benchmark", lambda: tasks.benchmarks(
    "Sweep" if as_sweep else "Benchmark", configs, storage.get_store(), as_sweep), where=start_column,
    disabled=not configs)

if mode == "Single run" and config:
    with st.expander("Find batch size: the largest micro-batch that fits, and the fastest",
                     expanded="run.find" in st.session_state):
        find_batch_panel(config, predict.DEFAULT_MARGIN, key="run.find")

# ---------------------------------------------------------------- results of these settings
fresh = bool(state and state.results)
latest = list(state.results) if fresh else stored_for(configs, stored or [])
if latest:
    shown_results(latest, fresh)
else:
    st.info("Not run yet: no stored run has these settings. Press **Run benchmark** to measure them.")
