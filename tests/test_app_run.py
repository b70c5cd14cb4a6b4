"""Run page: real tiny CPU benchmarks started from the page, the device queue, sweeps, cancel,
and the link (query-parameter) contract."""
import pytest

from app import form, params
from app.params import parse_query_params, to_query_params
from engine import devicelock, limits, models, presets
from engine.config import FIELD_NAMES, FIELDS_BY_NAME, SCALAR_FIELDS, BenchConfig
from tests.app_fixtures import (TINY_DIMS, app_db, chart_titles, click, finished, open_app, shown,  # noqa: F401
                                make_result, task, tiny_settings, wait_until)

TASK = "run.task"


def progress_texts(at) -> list[str]:
    return [shown(p.text) for p in at.get("progress")]


def sidebar_keys(at) -> list[str]:
    """Keys of the sidebar's widgets that belong to the configuration form."""
    widgets = [*at.sidebar.selectbox, *at.sidebar.number_input, *at.sidebar.text_input, *at.sidebar.checkbox]
    return [w.key for w in widgets if w.key and w.key.startswith(form.PREFIX)]


def test_a_tiny_cpu_benchmark_waits_for_the_device_then_is_stored_and_shown(app_db):
    at = tiny_settings(open_app())
    assert "Not run yet" in at.info[0].value
    # Someone else is benchmarking on the CPU: the page says so and where we are in the queue.
    with devicelock.device_queue("cpu"):
        click(at, "Run benchmark")
        wait_until(at, lambda at: task(at, TASK).queue_position == 1, timeout=30, what="the device queue")
        assert any("waiting for the device (place 1 in the queue)" in text and " s elapsed" in text
                   for text in progress_texts(at))
        assert not app_db.count()
    state = wait_until(at, finished(TASK)).session_state[TASK].state()
    assert [r.status for r in state.results] == ["ok"], state.results[0].error
    [stored] = app_db.list()
    assert stored.id == state.results[0].id
    assert stored.config.overrides == TINY_DIMS and stored.env.device_type == "cpu"
    assert chart_titles(at) == ["Throughput", "Peak memory", "Backward time"]
    assert [m.label for m in at.metric][:2] == ["Throughput (tokens/s)", "Peak memory (GiB)"]
    assert at.subheader[0].value == "Latest results"


def test_a_sweep_shows_its_queue_and_stores_every_run_as_one_sweep(app_db):
    at = tiny_settings(open_app())
    at.segmented_control(key="run.mode").set_value("Sweep").run()
    at.multiselect(key="run.sweep.fields").set_value(["batch"]).run()
    at.text_input(key="run.sweep.batch").set_value("1,2").run()
    assert "2 configs" in " ".join(c.value for c in at.caption)
    click(at, "Run benchmark")
    queue = at.dataframe[0].value
    assert list(queue["batch"]) == [1, 2] and queue["state"].iloc[1] in ("waiting", "running")
    wait_until(at, finished(TASK))
    state = task(at, TASK)
    stored = app_db.list()
    assert sorted(r.config.batch for r in stored) == [1, 2]
    assert len({r.sweep_id for r in stored}) == 1 and stored[0].sweep_id
    done = at.dataframe[0].value
    assert list(done["state"]) == ["done", "done"]
    by_batch = {r.config.batch: r for r in stored}
    # The step time's spread beside each row's throughput: a noisy row is visible as such.
    assert list(done["step noise %"]) == [100 * by_batch[b].metrics.step_ms.iqr_rel for b in (1, 2)]
    assert [r.status for r in state.results] == ["ok", "ok"]
    assert chart_titles(at) == ["Throughput", "Peak memory", "Backward time"]


def test_an_invalid_sweep_value_is_an_error_not_a_crash(app_db):
    at = open_app()
    at.segmented_control(key="run.mode").set_value("Sweep").run()
    at.multiselect(key="run.sweep.fields").set_value(["batch"]).run()
    at.text_input(key="run.sweep.batch").set_value("1,two").run()
    assert not at.exception
    assert "batch" in at.error[0].value and "comma-separated values, each an integer >= 1" in shown(at.error[0].value)
    assert [b for b in at.button if b.label == "Run benchmark"][0].disabled


def test_query_parameters_round_trip(app_db):
    link = {"model": "gpt-small", "batch": "4", "accum": "2", "precision": "bf16", "ckpt": "every-k", "k": "3",
            "optimizer": "sgd", "steps": "7"}
    at = open_app(query=link)
    assert not at.warning
    assert at.selectbox(key="config.model").value == "gpt-small"
    assert at.number_input(key="config.batch").value == 4 and at.number_input(key="config.accum").value == 2
    assert at.selectbox(key="config.precision").value == "bf16" and at.selectbox(key="config.ckpt").value == "every-k"
    assert at.number_input(key="config.k").value == 3 and at.selectbox(key="config.optimizer").value == "sgd"
    assert at.number_input(key="config.steps").value == 7
    # The URL names every setting: the link's values, the defaults for the others.
    defaults = {field.name: field.format(field.default) for field in SCALAR_FIELDS}
    assert at.query_params == {**defaults, **link}
    assert "Effective batch: 4 × 2 = **8**" in [c.value for c in at.caption]
    # Changing a setting changes the URL and the link to copy.
    at.number_input(key="config.batch").set_value(16).run()
    assert at.query_params["batch"] == "16"
    assert "batch=16" in at.code[0].value and "model=gpt-small" in at.code[0].value
    # The settings survive a visit to another page.
    at.switch_page("views/compare.py").run()
    at.switch_page("views/run.py").run()
    assert at.number_input(key="config.batch").value == 16 and at.selectbox(key="config.model").value == "gpt-small"


def test_invalid_query_parameters_fall_back_to_defaults_with_a_warning(app_db, monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("a link must never make the app import a module")

    monkeypatch.setattr(models, "load_user_builder", never)
    at = open_app(query={"model": "os:system", "batch": "zero", "accum": "-1", "precision": "fp8", "ckpt": "full",
                         "steps": "0", "device": "cuda:7", "seq_len": "many", "width": "3"})
    assert not at.exception and not at.error
    warnings = " ".join(w.value for w in at.warning)
    for name in ("model", "batch", "accum", "precision", "steps", "device", "seq_len", "width"):
        assert f"Link parameter {name}=" in shown(warnings)
    # What the link said and what is allowed, as plain text (a link cannot inject Markdown).
    assert "precision\\='fp8' ignored \\(allowed\\: fp32, fp16, bf16\\)" in warnings
    assert at.selectbox(key="config.model").value == "gpt-tiny" and at.number_input(key="config.batch").value == 8
    assert at.selectbox(key="config.precision").value == "fp32"
    assert at.selectbox(key="config.ckpt").value == "full"  # the valid one is kept
    assert at.query_params["batch"] == "8" and at.query_params["model"] == "gpt-tiny"
    assert at.query_params["device"] == "auto" and "seq_len" not in at.query_params


def test_link_helpers_never_put_a_module_in_a_link():
    settings, warnings = parse_query_params({"model": "evil.module:build", "batch": ["2", "3"]})
    assert settings == {"batch": 3} and "not a built-in model" in warnings[0]
    assert "model" not in to_query_params(BenchConfig(model="mypkg.models:build", batch=2))


def test_the_form_and_the_link_list_exactly_the_configs_fields(app_db):
    # The form: one widget per field (the model dimensions stand for "overrides").
    at = open_app()
    keys = sidebar_keys(at)
    dims = [k for k in keys if k.startswith(form.dim_key("gpt-tiny", ""))]
    assert {k.removeprefix(form.PREFIX) for k in keys if k not in dims} == set(FIELD_NAMES) - {"overrides"}
    assert [k.removeprefix(form.dim_key("gpt-tiny", "")) for k in dims] == list(presets.preset_dims("gpt-tiny")[1])
    assert at.number_input(key="config.k").disabled  # k only applies with every-k checkpointing
    # The link: every scalar field by its name, every changed dimension by its --set key.
    everything = {name: value + 1 for name, value in presets.preset_dims("gpt-tiny")[1].items()}
    everything["d_model"] = everything["n_heads"] * 40  # heads must divide the width
    config = BenchConfig(overrides=everything, memory_cap_gib=0.5)
    assert set(to_query_params(config)) == {f.name for f in SCALAR_FIELDS} | set(everything)
    # ... and reading it back gives the same configuration.
    settings, warnings = parse_query_params(to_query_params(config))
    assert not warnings and BenchConfig(**settings) == config
    # Every model dimension of every preset is a link parameter.
    for model in presets.PRESETS:
        _, dims = presets.preset_dims(model)
        assert set(dims) <= set(presets.dimension_names())


def test_a_link_with_model_dimensions_and_warmup_restores_them_and_the_run_carries_them(app_db):
    link = {"model": "gpt-tiny", **{name: str(value) for name, value in TINY_DIMS.items()}, "warmup": "2",
            "steps": "2", "device": "cpu", "memory_cap_gib": "3.5", "seed": "7"}
    at = open_app(query=link)
    assert not at.warning, [w.value for w in at.warning]
    for name, value in TINY_DIMS.items():
        assert at.number_input(key=form.dim_key("gpt-tiny", name)).value == value
    assert at.number_input(key="config.warmup").value == 2
    assert at.number_input(key="config.memory_cap_gib").value == 3.5 and at.number_input(key="config.seed").value == 7
    assert {name: at.query_params[name] for name in link} == link
    click(at, "Run benchmark")
    wait_until(at, finished(TASK))
    [stored] = app_db.list()
    assert stored.status == "ok", stored.error
    assert stored.config.overrides == TINY_DIMS and stored.config.warmup == 2
    assert stored.config.memory_cap_gib == 3.5 and stored.config.seed == 7


def test_presentation_mode_travels_in_the_link(app_db):
    at = open_app(query={params.PRESENT: "1"})
    assert at.session_state["presentation"] is True
    assert at.query_params[params.PRESENT] == "1"


@pytest.mark.parametrize("allowed", [False, True])
def test_a_user_model_field_only_when_the_setting_allows_it(app_db, monkeypatch, allowed):
    monkeypatch.setenv("TRADEOFF_LAB_ALLOW_USER_MODELS", "1" if allowed else "0")
    at = open_app()
    labels = [t.label for t in at.text_input]
    assert ("Your model (module:function)" in labels) is allowed


def test_cancel_stops_a_running_benchmark_and_records_it(app_db, monkeypatch):
    monkeypatch.setenv("TRADEOFF_LAB_MAX_STEPS", "100000")  # a benchmark that would run for minutes
    at = tiny_settings(open_app(), steps=100_000)
    click(at, "Run benchmark")
    wait_until(at, lambda at: task(at, TASK).event.phase in ("warmup", "measure"), what="the benchmark to start")
    click(at, "Cancel")
    wait_until(at, finished(TASK), timeout=60)
    assert [r.status for r in task(at, TASK).results] == ["cancelled"]
    assert app_db.list()[0].status == "cancelled"
    # Said plainly, and no empty charts.
    assert any(i.value.startswith("Cancelled: 1 run(s) stopped before they finished") for i in at.info)
    assert not at.get("plotly_chart") and not at.error


def test_find_batch_size_from_the_run_page_shows_the_trials(app_db):
    at = tiny_settings(open_app())
    at.number_input(key="run.find.max").set_value(2).run()
    click(at, "Find batch size")
    wait_until(at, finished("run.find"))
    report = task(at, "run.find").value
    assert report["max_batch"] == 2 and [t["batch"] for t in report["trials"]] == [1, 2]
    # It stopped at its own limit: a lower bound, said as such.
    assert [m.value for m in at.metric if m.label == "Largest micro-batch that fits"] == ["≥ 2"]
    assert any("A lower bound, not the answer" in shown(w.value) for w in at.warning)
    assert "Batch finder trials" in chart_titles(at)
    assert len(app_db.list()) == 2  # every trial is a stored run


def test_the_presentation_toggle_is_in_the_sidebar(app_db):
    at = open_app()
    [toggle] = [t for t in at.sidebar.toggle if t.label == "Presentation mode"]
    toggle.set_value(True).run()
    assert at.session_state["presentation"] is True and not at.exception


def test_a_link_cannot_ask_for_more_than_the_servers_limits(app_db, monkeypatch):
    monkeypatch.setenv("TRADEOFF_LAB_MAX_STEPS", "500")
    at = open_app(query={"batch": "100000000", "steps": "1000000000", "accum": str(10**15), "timeout_s": "1e12",
                         "warmup": "2"})
    assert not at.exception and not at.error
    warnings = shown(" ".join(w.value for w in at.warning))
    for name in ("batch", "steps", "accum", "timeout_s"):
        assert f"Link parameter {name}=" in warnings
    assert "TRADEOFF_LAB_MAX_STEPS" in warnings  # which setting bounds it
    assert at.number_input(key="config.batch").value == 8 and at.number_input(key="config.steps").value == 10
    assert at.number_input(key="config.warmup").value == 2  # a value within the limits is kept
    # The form's inputs stop at the same limits.
    assert at.number_input(key="config.steps").max == 500
    assert at.number_input(key="config.batch").max == limits.limit_for("batch")
    assert at.number_input(key="run.find.max").max == limits.limit_for("batch")  # the batch finder's too


def test_a_sweep_larger_than_the_limit_is_refused_before_it_is_expanded(app_db):
    at = open_app()
    at.segmented_control(key="run.mode").set_value("Sweep").run()
    at.multiselect(key="run.sweep.fields").set_value(["batch", "accum"]).run()
    values = ",".join(str(v) for v in range(1, 1001))
    at.text_input(key="run.sweep.batch").set_value(values)
    at.text_input(key="run.sweep.accum").set_value(values).run()
    assert not at.exception
    [error] = [shown(e.value) for e in at.error]
    assert "1,000,000 configurations" in error and "TRADEOFF_LAB_MAX_SWEEP" in error
    assert [b for b in at.button if b.label == "Run benchmark"][0].disabled


def test_a_sweep_value_above_the_limits_is_refused(app_db):
    at = open_app()
    at.segmented_control(key="run.mode").set_value("Sweep").run()
    at.multiselect(key="run.sweep.fields").set_value(["batch"]).run()
    at.text_input(key="run.sweep.batch").set_value("1").run()
    at.number_input(key="run.sweep.effective_batch").set_value(10**6).run()  # accum = 1,000,000
    [error] = [shown(e.value) for e in at.error]
    assert error.startswith("Invalid setting: accum: invalid value 1000000") and "TRADEOFF_LAB_MAX_ACCUM" in error


@pytest.mark.parametrize("setting, message", [("lots", "Invalid setting: TRADEOFF_LAB_MAX_BATCH: invalid value 'lots'"),
                                              ("0", "Invalid setting: batch: invalid value 1; allowed: at most 0")])
def test_a_broken_or_impossible_limit_setting_is_named_instead_of_a_traceback(app_db, monkeypatch, setting, message):
    monkeypatch.setenv("TRADEOFF_LAB_MAX_BATCH", setting)
    at = open_app()
    assert not at.exception
    [error] = [shown(e.value) for e in at.error]
    assert error.startswith(message) and "TRADEOFF_LAB_MAX_BATCH" in error


def test_a_link_with_a_sweep_opens_it_and_says_it_came_from_a_link(app_db):
    app_db.add(make_result(batch=4))  # an unrelated run: never shown as these settings' result
    link = {"model": "gpt-tiny", "seq_len": "32", "warmup": "1", "sweep": "batch,precision",
            "sweep_batch": "1,2", "sweep_precision": "fp32,bf16", "sweep_effective_batch": "4"}
    at = open_app(query=link)
    assert at.segmented_control(key="run.mode").value == "Sweep"
    assert at.multiselect(key="run.sweep.fields").value == ["batch", "precision"]
    assert at.text_input(key="run.sweep.batch").value == "1,2"
    assert at.multiselect(key="run.sweep.precision").value == ["fp32", "bf16"]
    assert at.number_input(key="run.sweep.effective_batch").value == 4
    assert any(i.value.startswith("Settings from a shared link") for i in at.info)
    assert any(i.value.startswith("Not run yet") for i in at.info) and not at.get("plotly_chart")
    # The page's own link carries all of it back.
    assert {k: at.query_params[k][0] if isinstance(at.query_params[k], list) else at.query_params[k]
            for k in link} == link


def test_a_sweep_definition_round_trips_through_its_link_model_dimensions_included():
    grid = {"batch": [1, 2], "precision": ["fp32", "bf16"], "overrides.seq_len": [16, 32]}
    link = params.sweep_to_query_params(grid, 4)
    assert link == {"sweep": "batch,precision,seq_len", "sweep_batch": "1,2", "sweep_precision": "fp32,bf16",
                    "sweep_seq_len": "16,32", "sweep_effective_batch": "4"}
    assert params.parse_sweep_params(link, "gpt-tiny") == (grid, 4, [])
    assert "overrides.seq_len" in params.sweep_axes("gpt-tiny") and "overrides.width" in params.sweep_axes("mlp")
    assert "overrides.width" not in params.sweep_axes("gpt-tiny")
    assert not any(axis.startswith("overrides.") for axis in params.sweep_axes("mypkg.models:build"))
    other, _, [warning] = params.parse_sweep_params(link, "mlp")  # an mlp has no sequence length
    assert other == {"batch": [1, 2], "precision": ["fp32", "bf16"]} and "'seq_len' ignored" in warning


def _param(at, name: str) -> str:
    value = at.query_params[name]
    return value[0] if isinstance(value, list) else value


def test_a_model_dimension_is_a_sweep_axis_that_a_link_carries_and_restores(app_db):
    link = {"model": "gpt-tiny", "n_layers": "1", "warmup": "1", "sweep": "seq_len,precision",
            "sweep_seq_len": "16,32,64", "sweep_precision": "fp32,bf16"}
    at = open_app(query=link)
    assert at.segmented_control(key="run.mode").value == "Sweep"
    assert at.multiselect(key="run.sweep.fields").value == ["overrides.seq_len", "precision"]
    assert at.text_input(key="run.sweep.overrides.seq_len").value == "16,32,64"
    assert "6 configs" in " ".join(c.value for c in at.caption)
    assert {k: _param(at, k) for k in link} == link  # the page's own link carries it back
    # Picked on the page: the model's dimensions are offered (another model's are not), a new
    # axis starts from the model's value and its double, and the link names it by its key.
    at = tiny_settings(open_app())
    at.segmented_control(key="run.mode").set_value("Sweep").run()
    offered = at.multiselect(key="run.sweep.fields").options
    assert {"seq_len (model dimension)", "n_layers (model dimension)"} <= set(offered)
    assert not any(option.startswith("width") for option in offered)  # an mlp dimension
    at.multiselect(key="run.sweep.fields").set_value(["overrides.n_layers"]).run()
    assert at.text_input(key="run.sweep.overrides.n_layers").value == f"{TINY_DIMS['n_layers']},{2 * TINY_DIMS['n_layers']}"
    at.text_input(key="run.sweep.overrides.n_layers").set_value("1,3").run()
    assert (_param(at, "sweep"), _param(at, "sweep_n_layers")) == ("n_layers", "1,3")
    at.text_input(key="run.sweep.overrides.n_layers").set_value("1,none").run()
    assert any("overrides.n_layers: invalid value 'none'" in shown(e.value) for e in at.error)
    # Another model: its dimensions replace the axis it lacks.
    at.sidebar.selectbox(key=form.field_key("model")).set_value("mlp").run()
    assert not at.exception and at.multiselect(key="run.sweep.fields").value == []


def test_a_model_dimension_sweep_runs_and_stores_each_runs_dimensions(app_db):
    at = tiny_settings(open_app())
    at.segmented_control(key="run.mode").set_value("Sweep").run()
    at.multiselect(key="run.sweep.fields").set_value(["overrides.seq_len"]).run()
    at.text_input(key="run.sweep.overrides.seq_len").set_value("8,16").run()
    click(at, "Run benchmark")
    wait_until(at, finished(TASK))
    stored = app_db.list()
    assert sorted(r.config.overrides["seq_len"] for r in stored) == [8, 16]
    assert all(r.status == "ok" and r.config.overrides["n_layers"] == TINY_DIMS["n_layers"] for r in stored)


def test_a_bad_model_dimension_sweep_in_a_link_is_named_and_left_out(app_db):
    at = open_app(query={"model": "mlp", "sweep": "seq_len,width,depth", "sweep_width": "8,0", "sweep_depth": "1,2"})
    warnings = " ".join(shown(w.value) for w in at.warning)
    assert "sweep: 'seq_len' ignored (allowed for mlp:" in warnings and "depth" in warnings
    assert "sweep_width='8,0' ignored" in warnings
    assert at.multiselect(key="run.sweep.fields").value == ["overrides.depth"]


def test_a_bad_sweep_in_a_link_is_named_and_left_out(app_db):
    at = open_app(query={"sweep": "batch,colour", "sweep_batch": "1,x"})
    warnings = " ".join(shown(w.value) for w in at.warning)
    assert "sweep: 'colour' ignored" in warnings and "sweep_batch" in warnings


def test_the_expected_peak_and_duration_are_shown_before_running_and_a_misfit_warned(app_db):
    at = open_app(query={"model": "gpt-xl", "batch": "8", "device": "cpu"})
    assert any("Expected: peak about" in shown(c.value) and "analytic estimate" in shown(c.value) for c in at.caption)
    assert any("most likely not fit" in shown(w.value) for w in at.warning)


def test_the_first_minute_says_what_the_tool_answers_and_loads_the_demo_data_right_there(app_db):
    at = open_app()
    assert "cost and save on your model" in at.markdown[0].value
    assert any("Run benchmark" in m.value and "Compare and decide" in m.value for m in at.markdown)
    click(at, "Load demo data")
    assert not at.exception and app_db.count() > 0
    assert all(r.origin == "demo" for r in app_db.list())


def test_rarely_changed_settings_sit_in_closed_sections_a_link_that_sets_one_opens_it(app_db):
    sections = {f.spec.group for f in FIELDS_BY_NAME.values() if f.spec.group}
    assert sections == {"Compiler, kernels and allocator", "Data parallel (several processes)"}

    def opened(at) -> dict[str, bool]:
        return {e.label: e.proto.expanded for e in at.sidebar.expander if e.label in sections}

    at = open_app()
    assert opened(at) == dict.fromkeys(sections, False)
    assert at.selectbox(key="config.attention").value == "auto"  # drawn, only folded away
    at = open_app(query={"attention": "math"})
    assert opened(at) == {"Compiler, kernels and allocator": True, "Data parallel (several processes)": False}
    assert at.selectbox(key="config.attention").value == "math"
