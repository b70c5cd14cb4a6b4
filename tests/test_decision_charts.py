"""Decision figure builders (app/charts/decisions.py), checked on fig.to_dict()."""
import dataclasses

from app.charts import common
from app.charts import decisions as charts
from engine import frontier, gains, predict
from engine.config import GIB, BenchConfig
from tests.app_fixtures import H100_ENV, make_result, with_metrics

MIB = 2**20


def trace(fig: dict, name: str) -> dict:
    [found] = [t for t in fig["data"] if t.get("name") == name]
    return found


def hlines(fig: dict) -> list[float]:
    return sorted(s["y0"] for s in fig["layout"].get("shapes", []) if s["y0"] == s["y1"])


def finder_report() -> dict:
    trial = lambda b, status, fits, peak, rate: {"batch": b, "status": status, "fits": fits,  # noqa: E731
                                                 "peak_allocated_bytes": peak, "samples_per_s": rate,
                                                 "result_id": str(b), "error": None}
    return {"max_batch": 3, "best_batch": 2, "capacity_bytes": 8 * GIB, "budget_bytes": 7.6 * GIB, "margin": 0.05,
            "exact": True, "stopped": None, "trials": [
                trial(1, "ok", True, 2 * GIB, 100.0), trial(2, "ok", True, 4 * GIB, 180.0),
                trial(4, "oom", False, None, None), trial(3, "ok", True, 6 * GIB, 170.0)]}


def test_finder_trials_chart():
    fig = charts.build_finder_trials(finder_report()).to_dict()
    assert fig["layout"]["title"]["text"] == charts.FINDER_TITLE
    fits, misfits = trace(fig, "fits"), trace(fig, "does not fit")
    assert list(fits["x"]) == [1, 2, 3] and list(fits["y"]) == [2, 4, 6]
    assert list(misfits["x"]) == [4] and list(misfits["y"]) == [8] and list(misfits["text"]) == ["OOM"]  # at capacity
    assert list(trace(fig, "samples/s")["x"]) == [1, 2, 3]
    assert hlines(fig) == [7.6, 8]
    assert fig["layout"]["xaxis"]["type"] == "log" and "GiB" in fig["layout"]["yaxis"]["title"]["text"]


def test_memory_prediction_chart_shows_measured_fitted_and_analytic():
    config = BenchConfig(model="gpt-tiny", device="cpu", overrides={"n_layers": 2, "seq_len": 32, "d_model": 64,
                                                                    "n_heads": 2, "vocab": 256})
    points = [(b, predict.analytic_estimate(config, b).peak) for b in (1, 2, 4, 8)]
    report = predict.report(points, config, predict.capacities([24, 80], 16 * GIB, "cpu"))
    fig = charts.build_memory_prediction(report).to_dict()
    assert fig["layout"]["title"]["text"] == charts.PREDICTION_TITLE
    assert [t["name"] for t in fig["data"]] == ["measured", "fitted: fixed + slope × batch", "analytic"]
    assert list(trace(fig, "measured")["x"]) == [1, 2, 4, 8]
    assert "MiB" in fig["layout"]["yaxis"]["title"]["text"]  # a tiny model is drawn in MiB
    # Every capacity is far above a few MiB: none drawn, all named as off the scale.
    subtitle = fig["layout"]["title"]["subtitle"]["text"]
    assert hlines(fig) == [] and "capacity of this cpu (16.0 GiB) 16 GiB, above the top of the chart" in subtitle
    assert "80 GiB, above the top of the chart" in subtitle and "off the scale" not in str(fig)


def frontier_runs() -> list:
    runs = [with_metrics(make_result(env=H100_ENV, batch=batch, accum=8 // batch), samples_per_s=rate,
                         peak_allocated_bytes=peak * GIB)
            for rate, peak, batch in ((100, 10, 1), (90, 20, 2), (180, 30, 4), (170, 40, 8))]
    return runs + [make_result("oom", env=H100_ENV, batch=8, accum=1, precision="bf16")]


def test_frontier_chart_marks_frontier_failures_budget_and_answer():
    runs = frontier_runs()
    answer = frontier.recommend(runs, 8, 35)
    fig = charts.build_frontier(runs, frontier.pareto_frontier(runs), answer).to_dict()
    assert fig["layout"]["title"]["text"] == charts.FRONTIER_TITLE
    assert list(trace(fig, "fp32 runs")["x"]) == [10, 20, 30, 40]
    assert list(trace(fig, "Pareto frontier")["x"]) == [10, 30]
    failed = trace(fig, common.FAILED_NAME)
    assert list(failed["x"]) == [80] and list(failed["y"]) == [0] and list(failed["text"]) == ["OOM"]
    assert list(trace(fig, "best")["x"]) == [30] and list(trace(fig, "runner-up")["x"]) == [10]
    vertical = sorted(s["x0"] for s in fig["layout"]["shapes"] if s["x0"] == s["x1"])
    assert vertical == [35, 80]  # budget, capacity


def timeline_record(ckpt: str, peak: int) -> dict:
    return {"config": BenchConfig(model="gpt-tiny", device="cpu", ckpt=ckpt).to_dict(), "device_type": "cpu",
            "source": "test", "t_ms": [0.0, 1.0, 2.0, 3.0], "bytes": [10 * MIB, peak, 12 * MIB, 10 * MIB],
            "phases": [{"phase": "forward", "start_ms": 0.0, "end_ms": 1.0},
                       {"phase": "backward", "start_ms": 1.0, "end_ms": 2.5},
                       {"phase": "optimizer", "start_ms": 2.5, "end_ms": 3.0}],
            "baseline_bytes": 10 * MIB, "peak_bytes": peak, "peak_ms": 1.0, "peak_phase": "forward"}


def test_memory_timeline_overlays_two_configs_with_phase_strips():
    fig = charts.build_memory_timeline([timeline_record("none", 40 * MIB), timeline_record("full", 20 * MIB)]).to_dict()
    assert fig["layout"]["title"]["text"] == charts.TIMELINE_TITLE
    lines = [t for t in fig["data"] if t["type"] == "scatter"]
    assert [t["name"] for t in lines] == ["batch 8 × accum 1, fp32, no checkpointing",
                                          "batch 8 × accum 1, fp32, full checkpointing"]
    assert list(lines[0]["y"]) == [10, 40, 12, 10]
    bars = [t for t in fig["data"] if t["type"] == "bar"]
    assert len(bars) == 6 and sum(t["showlegend"] for t in bars) == 3  # each phase once in the legend
    assert [list(t["base"]) for t in bars[:3]] == [[0.0], [1.0], [2.5]]
    assert "MiB" in fig["layout"]["yaxis"]["title"]["text"]


def summary(median: float) -> dict:
    return {"median": median, "p10": median * 0.9, "p90": median * 1.1, "iqr_rel": 0.1}


def test_pitfall_chart_puts_both_methods_side_by_side():
    report = {"correct_method": "CUDA events, one synchronisation per step",
              "naive": {k: summary(v) for k, v in {"forward_ms": 1, "backward_ms": 2, "optimizer_ms": 90, "step_ms": 93}.items()},
              "correct": {k: summary(v) for k, v in {"forward_ms": 30, "backward_ms": 60, "optimizer_ms": 3, "step_ms": 93}.items()}}
    fig = charts.build_pitfall(report).to_dict()
    assert fig["layout"]["title"]["text"] == charts.PITFALL_TITLE and fig["layout"]["barmode"] == "group"
    naive, correct = fig["data"]
    assert list(naive["x"]) == ["forward", "backward", "optimizer", "whole step"]
    assert list(naive["y"]) == [1, 2, 90, 93] and list(correct["y"]) == [30, 60, 3, 93]
    assert correct["name"].startswith("CUDA events") and naive["error_y"]["array"][2] > 0


def test_numerical_cost_chart_has_one_bar_per_measured_run():
    base = with_metrics(make_result(batch=4), grad_rel_diff=0.0)
    cheap = with_metrics(make_result(batch=4, precision="bf16"), grad_rel_diff=4e-3)
    unmeasured = make_result(batch=8)
    runs = [base, cheap, unmeasured]
    fig = charts.build_numerical_cost(gains.gain_rows(runs), runs).to_dict()
    assert fig["layout"]["title"]["text"] == charts.NUMERICS_TITLE
    [bars] = fig["data"]
    assert list(bars["y"]) == [0.0, 4e-3] and list(bars["text"]) == ["0.00e+00", "4.00e-03"]
    # Synthetic bf16 steps: 15.9 ms against 25.5 ms in fp32.
    assert "1.60× samples/s" in bars["hovertext"][1] and "memory saved" in bars["hovertext"][1]
    assert f"baseline: batch 4 × accum 1, fp32, no checkpointing (run {base.id[:8]})" in bars["hovertext"][1]


def test_finder_chart_names_a_capacity_far_above_the_trials():
    report = finder_report()
    report["capacity_bytes"], report["budget_bytes"] = 2000 * GIB, 1900 * GIB
    fig = charts.build_finder_trials(report).to_dict()
    assert hlines(fig) == [] and fig["layout"]["title"]["subtitle"]["text"].endswith(
        "<br>device capacity 2,000 GiB, above the top of the chart; memory budget 1,900 GiB")


def test_text_from_runs_reaches_decision_figures_escaped():
    link = '<a href="https://example.invalid">x</a>'
    env = dataclasses.replace(H100_ENV, device_name=link)
    base = with_metrics(make_result(env=env, batch=4, model=f"{link}:build"), grad_rel_diff=0.0)
    other_gpu = dataclasses.replace(H100_ENV, device_name=f"{link} 2")
    cheap = with_metrics(make_result(env=other_gpu, batch=4, precision="bf16", model=f"{link}:build"), grad_rel_diff=4e-3)
    failed = make_result("oom", env=env, batch=8, model=f"{link}:build").replace(error=f"<img src=x> {link}")
    runs = [base, cheap, failed]
    figures = [charts.build_numerical_cost(gains.gain_rows(runs), runs).to_dict(),
               charts.build_frontier(runs, frontier.pareto_frontier(runs)).to_dict()]
    text = str(figures)
    assert "<a href" not in text and "<img" not in text
    assert "&lt;img src=x&gt; &lt;a href" in text  # the failed run's error, in the frontier's hover
    assert "&lt;a href" in str(figures[0]["data"][0]["x"])  # the runs' labels name their devices


def test_an_empty_numerical_cost_chart_says_so():
    runs = [make_result(batch=8)]
    fig = charts.build_numerical_cost(gains.gain_rows(runs), runs).to_dict()
    assert "Nothing to show" in fig["layout"]["annotations"][0]["text"]
    assert fig["layout"]["yaxis"]["visible"] is False


def test_timeline_memory_axis_starts_at_zero():
    fig = charts.build_memory_timeline([timeline_record("none", 40 * MIB)]).to_dict()
    assert fig["layout"]["yaxis"]["rangemode"] == "tozero"


def test_frontier_zooms_to_the_runs_and_keeps_the_budget_and_says_where_a_far_capacity_is():
    runs = [with_metrics(make_result(batch=b), samples_per_s=10.0 * b, peak_allocated_bytes=b * MIB) for b in (1, 2, 4)]
    answer = frontier.recommend(runs, 4, 8 / 1024)  # an 8 MiB budget, 16 GiB capacity
    fig = charts.build_frontier(runs, frontier.pareto_frontier(runs), answer).to_dict()
    right = fig["layout"]["xaxis"]["range"][1]
    assert 8 <= right < 16 * 1024  # in MiB: budget visible, capacity not squeezing the runs
    assert "capacity 16 GiB, to the right of the chart" in fig["layout"]["title"]["subtitle"]["text"]
