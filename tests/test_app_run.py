"""Run page: real tiny CPU benchmarks started from the page, the device queue, sweeps, cancel,
and the link (query-parameter) contract."""
import time

import pytest

from app.params import parse_query_params, to_query_params
from engine import devicelock, models
from tests.app_fixtures import app_db, chart_titles, click, open_app  # noqa: F401 - app_db is a fixture

TINY_DIMS = {"seq_len": 32, "d_model": 64, "n_layers": 2, "n_heads": 2, "vocab": 256}
RUN_TIMEOUT_S = 180


def tiny_settings(at, steps: int = 2):
    """gpt-tiny with tiny dimensions on the CPU: a run takes well under a second once warm."""
    for name, value in TINY_DIMS.items():
        at.number_input(key=f"run.dim.gpt-tiny.{name}").set_value(value)
    at.number_input(key="run.warmup").set_value(1)
    at.number_input(key="run.steps").set_value(steps)
    at.selectbox(key="run.device").set_value("cpu")
    return at.run()


def poll(at, until, timeout: float = RUN_TIMEOUT_S):
    """Rerun the page (as the fragment's polling would) until ``until(snapshot)`` holds."""
    deadline = time.monotonic() + timeout
    while True:
        at.run()
        snapshot = at.session_state["run.job"].snapshot()
        if until(snapshot):
            return snapshot
        assert time.monotonic() < deadline, f"job stuck: {snapshot.describe()}"
        time.sleep(0.2)


def progress_texts(at) -> list[str]:
    return [p.text for p in at.get("progress")]


def test_a_tiny_cpu_benchmark_waits_for_the_device_then_is_stored_and_shown(app_db):
    at = tiny_settings(open_app())
    assert "No runs yet" in at.info[0].value
    # Someone else is benchmarking on the CPU: the page says so and where we are in the queue.
    with devicelock.device_queue("cpu"):
        click(at, "Run benchmark")
        poll(at, lambda s: s.queue_position == 1, timeout=30)
        assert any("waiting for the device (place 1 in the queue)" in text for text in progress_texts(at))
        assert not app_db.count()
    snapshot = poll(at, lambda s: s.finished)
    assert [r["status"] for r in snapshot.results] == ["ok"], snapshot.results[0]["error"]
    at.run()
    assert not at.exception
    [stored] = app_db.list()
    assert stored["id"] == snapshot.results[0]["id"]
    assert stored["config"]["overrides"] == TINY_DIMS and stored["env"]["device_type"] == "cpu"
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
    snapshot = poll(at, lambda s: s.finished)
    at.run()
    stored = app_db.list()
    assert sorted(r["config"]["batch"] for r in stored) == [1, 2]
    assert len({r["sweep_id"] for r in stored}) == 1 and stored[0]["sweep_id"]
    assert list(at.dataframe[0].value["state"]) == ["done", "done"]
    assert [r["status"] for r in snapshot.results] == ["ok", "ok"]
    assert chart_titles(at) == ["Throughput", "Peak memory", "Backward time"]


def test_an_invalid_sweep_value_is_an_error_not_a_crash(app_db):
    at = open_app()
    at.segmented_control(key="run.mode").set_value("Sweep").run()
    at.multiselect(key="run.sweep.fields").set_value(["batch"]).run()
    at.text_input(key="run.sweep.batch").set_value("1,two").run()
    assert not at.exception
    assert "batch" in at.error[0].value and "comma-separated whole numbers" in at.error[0].value
    assert [b for b in at.button if b.label == "Run benchmark"][0].disabled


def test_query_parameters_round_trip(app_db):
    link = {"model": "gpt-small", "batch": "4", "accum": "2", "precision": "bf16", "ckpt": "every-k", "k": "3",
            "optimizer": "sgd", "steps": "7"}
    at = open_app(query=link)
    assert not at.warning
    assert at.selectbox(key="run.model").value == "gpt-small"
    assert at.number_input(key="run.batch").value == 4 and at.number_input(key="run.accum").value == 2
    assert at.selectbox(key="run.precision").value == "bf16" and at.selectbox(key="run.ckpt").value == "every-k"
    assert at.number_input(key="run.k").value == 3 and at.selectbox(key="run.optimizer").value == "sgd"
    assert at.number_input(key="run.steps").value == 7
    assert at.query_params == link
    assert "Effective batch: 4 × 2 = **8**" in [c.value for c in at.caption]
    # Changing a setting changes the URL and the link to copy.
    at.number_input(key="run.batch").set_value(16).run()
    assert at.query_params["batch"] == "16"
    assert "batch=16" in at.code[0].value and "model=gpt-small" in at.code[0].value
    # The settings survive a visit to another page.
    at.switch_page("views/compare.py").run()
    at.switch_page("views/run.py").run()
    assert at.number_input(key="run.batch").value == 16 and at.selectbox(key="run.model").value == "gpt-small"


def test_invalid_query_parameters_fall_back_to_defaults_with_a_warning(app_db, monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("a link must never make the app import a module")

    monkeypatch.setattr(models, "load_user_builder", never)
    at = open_app(query={"model": "os:system", "batch": "zero", "accum": "-1", "precision": "fp8", "ckpt": "full",
                         "steps": "0"})
    assert not at.exception and not at.error
    warnings = " ".join(w.value for w in at.warning)
    for name in ("model", "batch", "accum", "precision", "steps"):
        assert f"Link parameter {name}=" in warnings
    assert at.selectbox(key="run.model").value == "gpt-tiny" and at.number_input(key="run.batch").value == 8
    assert at.selectbox(key="run.precision").value == "fp32"
    assert at.selectbox(key="run.ckpt").value == "full"  # the valid one is kept
    assert at.query_params["batch"] == "8" and at.query_params["model"] == "gpt-tiny"


def test_link_helpers_never_put_a_module_in_a_link():
    settings, warnings = parse_query_params({"model": "evil.module:build", "batch": ["2", "3"]})
    assert settings == {"batch": 3} and "not a built-in model" in warnings[0]
    assert "model" not in to_query_params({"model": "mypkg.models:build", "batch": 2})


@pytest.mark.parametrize("allowed", [False, True])
def test_a_user_model_field_only_when_the_setting_allows_it(app_db, monkeypatch, allowed):
    monkeypatch.setenv("TRADEOFF_LAB_ALLOW_USER_MODELS", "1" if allowed else "0")
    at = open_app()
    labels = [t.label for t in at.text_input]
    assert ("Your model (module:function)" in labels) is allowed


def test_cancel_stops_a_running_benchmark_and_records_it(app_db):
    at = tiny_settings(open_app(), steps=100_000)
    click(at, "Run benchmark")
    poll(at, lambda s: s.event.get("phase") in ("warmup", "measure"))
    click(at, "Cancel")
    snapshot = poll(at, lambda s: s.finished, timeout=60)
    at.run()
    assert [r["status"] for r in snapshot.results] == ["cancelled"]
    assert app_db.list()[0]["status"] == "cancelled"
    assert at.error[0].value.startswith("CANCELLED")


def test_find_batch_size_from_the_run_page_shows_the_trials(app_db):
    at = tiny_settings(open_app())
    at.number_input(key="run.find.max").set_value(2).run()
    click(at, "Find batch size")
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while not at.session_state["run.find"].done:
        assert time.monotonic() < deadline, at.session_state["run.find"].describe()
        time.sleep(0.3)
        at.run()
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    report = at.session_state["run.find"].value
    assert report["max_batch"] == 2 and [t["batch"] for t in report["trials"]] == [1, 2]
    assert [m.value for m in at.metric if m.label == "Largest micro-batch that fits"] == ["2"]
    assert "Batch finder trials" in chart_titles(at)
    assert len(app_db.list()) == 2  # every trial is a stored run


def test_the_presentation_toggle_is_in_the_sidebar(app_db):
    at = open_app()
    [toggle] = [t for t in at.sidebar.toggle if t.label == "Presentation mode"]
    toggle.set_value(True).run()
    assert at.session_state["presentation"] is True and not at.exception
