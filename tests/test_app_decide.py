"""Decide page (AppTest): answers from stored runs, the shared configuration, and the tools
that measure, run for real on a tiny CPU config from the page."""
import dataclasses

from app import form
from engine.devices import this_host_id
from app.charts import decisions
from tests.app_fixtures import (H100_ENV, app_db, chart, chart_titles, click, finished, make_sweep, open_app,  # noqa: F401
                                shown, task, tiny_settings, wait_until, with_metrics)


def test_empty_store_renders_every_tab(app_db):
    at = open_app("views/decide.py")
    assert at.title[0].value == "Decide"
    assert [t.label for t in at.tabs] == ["Find batch size", "Predict memory", "Recommend", "Memory timeline",
                                          "Timing pitfall", "Numerical cost"]
    assert any("No stored runs yet" in i.value for i in at.info)
    assert decisions.PREDICTION_TITLE in chart_titles(at)  # the analytic curve needs no runs


def test_the_decide_page_uses_the_run_pages_configuration(app_db):
    at = open_app(query={"model": "gpt-small", "n_layers": "3"})
    at.number_input(key="config.batch").set_value(4)
    at.selectbox(key="config.ckpt").set_value("every-k")
    at.number_input(key="config.memory_cap_gib").set_value(2.0)
    at.number_input(key="config.seed").set_value(5)
    at.selectbox(key="config.device").set_value("cpu").run()
    at.switch_page("views/decide.py").run()
    assert not at.exception
    # One configuration per session: the same widgets, holding the Run page's values.
    assert at.selectbox(key="config.model").value == "gpt-small"
    assert at.number_input(key=form.dim_key("gpt-small", "n_layers")).value == 3
    assert at.number_input(key="config.batch").value == 4 and at.selectbox(key="config.ckpt").value == "every-k"
    assert not at.number_input(key="config.k").disabled  # k applies with every-k checkpointing
    assert at.number_input(key="config.memory_cap_gib").value == 2.0 and at.number_input(key="config.seed").value == 5
    assert at.selectbox(key="config.device").value == "cpu"
    # Its own extra input stays: the memory margin.
    assert at.number_input(key="decide.margin").value == 0.05
    # A change made here is the Run page's configuration too.
    at.number_input(key="config.batch").set_value(6).run()
    at.switch_page("views/run.py").run()
    assert at.number_input(key="config.batch").value == 6 and at.query_params["batch"] == "6"


def test_stored_runs_give_an_answer_in_words_and_the_frontier(app_db):
    runs = make_sweep(batches=(1, 2, 4), precisions=("fp32", "bf16"), oom_batch=4, env=H100_ENV)
    # Recorded on a GPU: the configs name cuda, which this machine does not have.
    runs = [r.replace(config=r.config.replace(device="cuda")) for r in runs]
    app_db.add_many([with_metrics(r, grad_rel_diff=0.0 if r.config.precision == "fp32" else 4e-3) if r.ok else r
                     for r in runs])
    at = open_app("views/decide.py")
    at.number_input(key="decide.rec.effective").set_value(2).run()
    at.number_input(key="decide.rec.budget").set_value(80.0).run()
    [answer] = [shown(s.value) for s in at.success]
    assert answer.startswith("Best: batch 2 × accum 1, bf16, no checkpointing:")
    assert "GiB of 80" in answer and "Runner-up: batch 2 × accum 1, fp32" in answer
    assert {decisions.FRONTIER_TITLE, decisions.NUMERICS_TITLE} <= set(chart_titles(at))
    # Missing candidates would run on cuda, which is not here: said, not offered.
    assert any("cannot be measured on this machine" in c.value and "device" in c.value for c in at.caption)
    assert not [b for b in at.button if b.label == "Measure missing candidates"]
    at.number_input(key="decide.rec.budget").set_value(0.001).run()
    assert shown(at.warning[0].value).startswith("Nothing measured at effective batch 2 fits 0.001 GiB. Closest:")


def test_the_recommender_answers_from_this_machines_runs_not_the_faster_demo_data(app_db):
    here_env = dataclasses.replace(make_sweep()[0].env, host_id=this_host_id())
    local = make_sweep("local", batches=(1, 2), precisions=("fp32",), env=here_env)
    # The demo data names the same CPU and is 8× faster.
    demo = [with_metrics(r, samples_per_s=8 * r.metrics.samples_per_s).replace(origin="demo")
            for r in make_sweep("demo", batches=(1, 2), precisions=("fp32",), env=here_env)]
    app_db.add_many(local + demo)
    at = open_app("views/decide.py")
    group = at.selectbox(key="decide.rec.group")
    assert "measured here" in group.format_func(group.value) and len(group.options) == 2
    at.number_input(key="decide.rec.effective").set_value(2).run()
    at.number_input(key="decide.rec.budget").set_value(80.0).run()
    [answer] = [shown(s.value) for s in at.success]
    assert f"{round(local[1].metrics.samples_per_s):,} samples/s" in answer
    assert f"{round(demo[1].metrics.samples_per_s):,}" not in answer
    # The other environment is there to pick, never mixed in.
    at.selectbox(key="decide.rec.group").set_value([o for o in group.options if "demo data" in o][0]).run()
    [answer] = [shown(s.value) for s in at.success]
    assert f"{round(demo[1].metrics.samples_per_s):,} samples/s" in answer


def test_tools_measure_a_tiny_cpu_config_from_the_page(app_db):
    at = tiny_settings(open_app("views/decide.py"), steps=3, batch=4)
    at.number_input(key="decide.find.max").set_value(2).run()
    click(at, "Find batch size")
    wait_until(at, finished("decide.find"))
    report = task(at, "decide.find").value
    assert report["max_batch"] == 2 and [t["batch"] for t in report["trials"]] == [1, 2]
    assert [m.value for m in at.metric][:2] == ["≥ 2", str(report["best_batch"])]  # its own limit: a lower bound
    assert len(app_db.list()) == 2  # every trial is a stored run
    click(at, "Time one step both ways")
    wait_until(at, finished("decide.pitfall"))
    assert any("no asynchrony" in shown(i.value) for i in at.info)
    click(at, "Record timeline")
    wait_until(at, finished("decide.timeline"))
    records = task(at, "decide.timeline").value
    assert [r["config"]["ckpt"] for r in records] == ["none", "full"]
    titles = chart_titles(at)
    assert {decisions.FINDER_TITLE, decisions.PITFALL_TITLE, decisions.TIMELINE_TITLE} <= set(titles)
    # The two trials are measured points of this configuration; their peaks do not grow with
    # the batch (the optimizer step sets them), so the prediction refuses a fit and says why.
    assert list(chart(at, decisions.PREDICTION_TITLE)["data"][0]["x"]) == [1, 2]
    assert any("do not grow with the batch" in shown(i.value) for i in at.info)


def test_measuring_for_the_fit_doubles_until_the_peak_grows_then_fits(app_db):
    at = tiny_settings(open_app("views/decide.py"))
    assert at.text_input(key="decide.predict.batches").value == "auto"
    click(at, "Measure for the fit")
    wait_until(at, finished("decide.predict.task"))
    batches = sorted(r.config.batch for r in app_db.list())
    assert batches[:2] == [1, 2] and all(b == 2 * a for a, b in zip(batches, batches[1:]))
    assert any(m.value.startswith("**Fit:** peak ≈") for m in at.markdown)
    # Two measured peaks grow with the batch now: nothing left to run.
    assert [b for b in at.button if b.label == "Measure for the fit"][0].disabled
