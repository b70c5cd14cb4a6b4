"""Decide page (AppTest): answers from stored runs, and the tools that measure, run for real
on a tiny CPU config from the page."""
import time

from app import charts
from tests.app_fixtures import H100_ENV, app_db, chart_titles, click, make_sweep, open_app  # noqa: F401 - app_db is a fixture

TINY_DIMS = {"seq_len": 32, "d_model": 64, "n_layers": 2, "n_heads": 2, "vocab": 256}
TASK_TIMEOUT_S = 180


def tiny_settings(at):
    for name, value in TINY_DIMS.items():
        at.number_input(key=f"decide.dim.gpt-tiny.{name}").set_value(value)
    at.number_input(key="decide.batch").set_value(4)
    at.number_input(key="decide.warmup").set_value(1)
    at.number_input(key="decide.steps").set_value(3)
    at.selectbox(key="decide.device").set_value("cpu")
    return at.run()


def wait(at, key: str):
    """Rerun the page (as its polling fragment would) until the task under ``key`` is done."""
    deadline = time.monotonic() + TASK_TIMEOUT_S
    while not at.session_state[key].done:
        assert time.monotonic() < deadline, f"{key} stuck: {at.session_state[key].describe()}"
        time.sleep(0.3)
        at.run()
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at.session_state[key]


def test_empty_store_renders_every_tab(app_db):
    at = open_app("views/decide.py")
    assert at.title[0].value == "Decide"
    assert [t.label for t in at.tabs] == ["Find batch size", "Predict memory", "Recommend", "Memory timeline",
                                          "Timing pitfall", "Numerical cost"]
    assert any("No stored runs yet" in i.value for i in at.info)
    assert charts.PREDICTION_TITLE in chart_titles(at)  # the analytic curve needs no runs


def test_stored_runs_give_an_answer_in_words_and_the_frontier(app_db):
    runs = make_sweep(batches=(1, 2, 4), precisions=("fp32", "bf16"), oom_batch=4, env=H100_ENV)
    for r in runs:
        r["config"]["device"] = "auto"  # recorded elsewhere: no cuda device to validate here
        r["metrics"]["grad_rel_diff"] = 0.0 if r["config"]["precision"] == "fp32" else 4e-3
    app_db.add_many(runs)
    at = open_app("views/decide.py")
    at.number_input(key="decide.rec.effective").set_value(2).run()
    at.number_input(key="decide.rec.budget").set_value(80.0).run()
    [answer] = at.success
    assert answer.value.startswith("Best: batch 2 × accum 1, bf16, no checkpointing:")
    assert "GiB of 80" in answer.value and "Runner-up: batch 2 × accum 1, fp32" in answer.value
    assert {charts.FRONTIER_TITLE, charts.NUMERICS_TITLE} <= set(chart_titles(at))
    at.number_input(key="decide.rec.budget").set_value(0.001).run()
    assert at.warning[0].value.startswith("Nothing measured at effective batch 2 fits 0.001 GiB. Closest:")


def test_tools_measure_a_tiny_cpu_config_from_the_page(app_db):
    at = tiny_settings(open_app("views/decide.py"))
    at.number_input(key="decide.find.max").set_value(2).run()
    click(at, "Find batch size")
    report = wait(at, "decide.find").value
    assert report["max_batch"] == 2 and [t["batch"] for t in report["trials"]] == [1, 2]
    assert [m.value for m in at.metric][:2] == ["2", str(report["best_batch"])]
    assert len(app_db.list()) == 2  # every trial is a stored run
    click(at, "Time one step both ways")
    wait(at, "decide.pitfall")
    assert any("no asynchrony" in i.value for i in at.info)
    click(at, "Record timeline")
    records = wait(at, "decide.timeline").value
    assert [r["config"]["ckpt"] for r in records] == ["none", "full"]
    titles = chart_titles(at)
    assert {charts.FINDER_TITLE, charts.PITFALL_TITLE, charts.TIMELINE_TITLE} <= set(titles)
    # The two trials are measured points of this configuration: the prediction has its fit.
    assert any(m.value.startswith("**Fit:** peak ≈") for m in at.markdown)
