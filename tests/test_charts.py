"""The per-run figure builders (app/charts/runs.py) and the shared layout, checked as pure
functions on ``fig.to_dict()``."""
import dataclasses

import plotly.graph_objects as go
import pytest

from app.charts import common
from app.charts import runs as charts
from engine.config import GIB
from tests.app_fixtures import CPU_ENV, H100_ENV, make_result, make_sweep, with_metrics


def _bars(fig_dict: dict) -> list[dict]:
    return [t for t in fig_dict["data"] if t["type"] == "bar"]


def _failed(fig_dict: dict) -> dict:
    [trace] = [t for t in fig_dict["data"] if t.get("name") == common.FAILED_NAME]
    return trace


def _statuses(fig_dict: dict) -> list[tuple]:
    """(x, status) written on each failed run: the failed-runs trace's text, or a per-run
    chart's empty bar labelled with its status."""
    failed = [t for t in fig_dict["data"] if t.get("name") == common.FAILED_NAME or t["type"] == "bar"]
    return [(x, text) for trace in failed for x, text in zip(trace["x"], trace.get("text") or [])
            if text in ("OOM", "TIMEOUT", "ERROR", "CANCELLED")]


@pytest.mark.parametrize("build, title, unit", [
    (charts.build_throughput, "Throughput", "tokens/s"),
    (charts.build_peak_memory, "Peak memory", "GiB"),
    (charts.build_backward_time, "Backward time", "ms"),
])
def test_three_charts_have_titles_units_one_bar_per_run_and_oom_placeholders(build, title, unit):
    results = make_sweep(batches=(1, 2, 4), precisions=("fp32", "bf16"), oom_batch=4)
    fig = build(results).to_dict()
    assert fig["layout"]["title"]["text"] == title
    assert fig["layout"]["yaxis"]["title"]["text"] == unit
    # Grouped by batch (horizontal labels), the model once in the axis title; precision is the colour.
    assert fig["layout"]["xaxis"]["title"]["text"] == "runs of gpt-tiny"
    assert fig["layout"]["xaxis"]["categoryarray"] == ["b1", "b2", "b4"] and fig["layout"]["barmode"] == "group"
    bars = {bar["name"]: bar for bar in _bars(fig)}
    assert set(bars) == {"fp32", "bf16"}
    assert all(list(bar["x"]) == ["b1", "b2", "b4"] for bar in bars.values())  # one bar per run, failed ones too
    # A failed run keeps its slot: an empty bar labelled with its status.
    assert _statuses(fig) == [("b4", "OOM"), ("b4", "OOM")]
    assert [bar["y"][2] for bar in bars.values()] == [0, 0]


def test_error_bars_come_from_p10_and_p90():
    result = make_result(batch=2)
    step = result.metrics.step_ms
    [bar] = _bars(charts.build_backward_time([result]).to_dict())
    backward = result.metrics.backward_ms
    assert bar["error_y"]["array"][0] == pytest.approx(backward.p90 - backward.median)
    assert bar["error_y"]["arrayminus"][0] == pytest.approx(backward.median - backward.p10)
    # Throughput is the inverse of step time: the slow (p90) step gives the low end.
    [bar] = _bars(charts.build_throughput([result]).to_dict())
    value = result.metrics.tokens_per_s
    assert bar["y"][0] == pytest.approx(value)
    assert bar["error_y"]["arrayminus"][0] == pytest.approx(value - value * step.median / step.p90)
    assert bar["error_y"]["array"][0] == pytest.approx(value * step.median / step.p10 - value)


def test_throughput_falls_back_to_samples_per_second_without_a_sequence_length():
    result = with_metrics(make_result(batch=2), tokens_per_s=None)
    fig = charts.build_throughput([result]).to_dict()
    assert fig["layout"]["yaxis"]["title"]["text"] == "samples/s"
    assert _bars(fig)[0]["y"][0] == pytest.approx(result.metrics.samples_per_s)


def test_memory_chart_draws_the_capacity_and_the_memory_cap_as_lines():
    near = dataclasses.replace(CPU_ENV, capacity_bytes=int(0.5 * GIB))  # close enough to the bars to stay on the scale
    results = [make_result(env=near, batch=2), make_result("oom", batch=8, memory_cap_gib=0.25)]
    fig = charts.build_peak_memory(results).to_dict()
    lines = sorted(shape["y0"] for shape in fig["layout"]["shapes"])
    assert lines == pytest.approx([0.25, 0.5])
    texts = [a["text"] for a in fig["layout"]["annotations"]]  # the lines' labels
    assert "memory cap 0.25 GiB" in texts
    assert any("Test CPU capacity 0.5 GiB" in text for text in texts)
    assert _statuses(fig) == [(charts.group_labels(results)[1], "OOM")]
    assert "range" not in fig["layout"]["yaxis"]


def test_a_capacity_far_above_the_bars_is_said_in_words():
    results = [make_result(batch=1)]  # a few hundred MiB against 16 GiB
    fig = charts.build_peak_memory(results).to_dict()
    assert fig["layout"]["shapes"][0]["y0"] == pytest.approx(16.0)
    top = fig["layout"]["yaxis"]["range"][1]
    assert top < 16.0
    assert fig["layout"]["title"]["subtitle"]["text"].endswith("<br>Test CPU capacity 16 GiB, above the top of the chart")
    assert "off the scale" not in str(fig)


def test_runs_from_different_devices_are_separate_legend_entries():
    results = [make_result(batch=2), make_result(env=H100_ENV, batch=2)]
    fig = charts.build_throughput(results).to_dict()
    assert sorted(bar["name"] for bar in _bars(fig)) == ["fp32 · NVIDIA H100 80GB HBM3",
                                                        "fp32 · Test CPU"]
    # Same precision and policy, so the same colour; the second environment is outlined.
    assert [bar["marker"]["line"]["width"] for bar in _bars(fig)] == [0, 3]
    assert charts.run_labels(results) == ["gpt-tiny · Test CPU", "gpt-tiny · NVIDIA H100 80GB HBM3"]


def test_labels_name_the_model_then_only_what_differs_and_stay_unique():
    results = make_sweep(batches=(1, 2), precisions=("fp32",))
    assert charts.run_labels(results) == ["gpt-tiny · b1", "gpt-tiny · b2"]
    repeats = [make_result(batch=2), make_result(batch=2)]
    labels = charts.run_labels(repeats)
    assert len(set(labels)) == 2 and all(label.startswith("gpt-tiny · b2 · fp32 · ckpt none #") for label in labels)
    dims = [make_result(batch=2), make_result(batch=2, overrides={"seq_len": 64})]
    assert charts.run_labels(dims) == ["gpt-tiny · seq_len 128", "gpt-tiny · seq_len 64"]
    models = [make_result(batch=2), make_result(model="mlp", batch=2)]
    assert charts.run_labels(models) == ["gpt-tiny", "mlp"]


def test_breakdowns_are_stacked_with_one_bar_per_run_and_part():
    results = make_sweep(batches=(1, 2), precisions=("fp32",), oom_batch=2)
    phases = charts.build_phase_breakdown(results).to_dict()
    assert phases["layout"]["barmode"] == "stack"
    assert [b["name"] for b in _bars(phases)] == ["forward", "backward", "optimizer"]
    assert all(b["x"] == ["b1"] for b in _bars(phases))
    assert _bars(phases)[1]["y"] == [results[0].metrics.backward_ms.median]
    memory = charts.build_memory_breakdown(results).to_dict()
    assert [b["name"] for b in _bars(memory)] == ["params", "grads", "optimizer", "activations", "other"]
    assert memory["layout"]["yaxis"]["title"]["text"] == "GiB"
    assert _bars(memory)[0]["y"] == [pytest.approx(results[0].metrics.memory_breakdown_bytes.params / GIB)]
    assert _statuses(memory) == [("b2", "OOM")]


def test_sweep_lines_have_one_line_per_other_setting_and_failed_points():
    results = make_sweep(batches=(1, 2, 4), precisions=("fp32", "bf16"), oom_batch=4)
    assert charts.sweep_fields(results)[:2] == ["batch", "effective_batch"]
    fig = charts.build_sweep_lines(results, "batch", "throughput").to_dict()
    assert fig["layout"]["title"]["text"] == "Throughput vs batch"
    assert fig["layout"]["xaxis"]["type"] == "log"
    lines = [t for t in fig["data"] if t.get("name") != common.FAILED_NAME]
    assert [(t["name"], list(t["x"])) for t in lines] == [("fp32", [1, 2]), ("bf16", [1, 2])]
    assert fig["layout"]["xaxis"]["title"]["text"] == "Micro-batch size (batch)"
    assert _failed(fig)["x"] == [4, 4] and _failed(fig)["text"] == ["OOM", "OOM"]


def test_a_seq_len_sweep_draws_one_line_per_other_setting_against_seq_len():
    seq_lens = (32, 64, 128)
    results = [make_result(sweep_id="s", batch=2, precision=p, overrides={"n_layers": 2, "seq_len": t})
               for p in ("fp32", "bf16") for t in seq_lens]
    assert charts.sweep_fields(results) == ["seq_len", "precision"]  # the model dimension first
    fig = charts.build_sweep_lines(results, "seq_len", "throughput").to_dict()
    assert fig["layout"]["title"]["text"] == "Throughput vs seq_len"
    assert fig["layout"]["xaxis"]["title"]["text"] == "seq_len (model dimension)"
    assert fig["layout"]["xaxis"]["type"] == "log" and list(fig["layout"]["xaxis"]["tickvals"]) == list(seq_lens)
    assert [(t["name"], list(t["x"])) for t in fig["data"]] == [("fp32", list(seq_lens)), ("bf16", list(seq_lens))]
    # Against precision instead: one line per seq_len, named in words.
    by_precision = charts.build_sweep_lines(results, "precision").to_dict()
    assert [t["name"] for t in by_precision["data"]] == ["seq_len 32", "seq_len 64", "seq_len 128"]
    # The bars group by the dimension like any varied setting; n_layers, fixed, says nothing.
    assert charts.group_labels(results[:3]) == ["seq_len 32", "seq_len 64", "seq_len 128"]


def test_a_fixed_effective_batch_sweep_is_one_line_not_one_per_accumulation():
    results = [make_result(batch=b, accum=8 // b) for b in (1, 2, 4, 8)]
    fig = charts.build_sweep_lines(results, "batch", "peak_memory").to_dict()
    [line] = fig["data"]
    assert line["name"] == "all runs" and list(line["x"]) == [1, 2, 4, 8]
    assert fig["layout"]["yaxis"]["title"]["text"] == "GiB"


def test_presentation_layout_scales_a_copy():
    fig = charts.build_throughput([make_result()])
    big = common.presentation_layout(fig).to_dict()
    assert big["layout"]["font"]["size"] > 12 and big["layout"]["height"] > common.CHART_HEIGHT
    assert fig.to_dict()["layout"]["height"] == common.CHART_HEIGHT


def test_a_sweep_over_a_field_some_runs_lack_is_categorical():
    results = [make_result(batch=2), make_result(batch=2, memory_cap_gib=0.5), make_result("oom", batch=2, memory_cap_gib=0.25)]
    fig = charts.build_sweep_lines(results, "memory_cap_gib", "peak_memory").to_dict()
    assert fig["layout"]["xaxis"]["type"] == "category"
    assert list(fig["data"][0]["x"]) == ["None", "0.5"] and _failed(fig)["x"] == ["0.25"]


def test_one_layout_helper_places_title_legend_and_axes():
    layout = common.layout(go.Figure(), "T", x_title="x", y_title="y", legend="below", right=50,
                           barmode="group").to_dict()["layout"]
    assert layout["title"] == {"text": "T", "y": 0.98, "yanchor": "top"} and layout["height"] == common.CHART_HEIGHT
    assert layout["legend"] == common.LEGENDS["below"] and layout["margin"] == {"l": 50, "r": 50, "t": 60, "b": 40}
    assert layout["xaxis"]["title"]["text"] == "x" and layout["yaxis"]["title"]["text"] == "y"
    assert layout["barmode"] == "group"


def test_failed_runs_are_one_trace_however_many_failed():
    def sizes(failed: int) -> list[tuple[int, int]]:
        results = [make_result("oom" if i < failed else "ok", sweep_id="s", batch=i + 1) for i in range(failed + 3)]
        figures = [build(results) for build in charts.MAIN_CHARTS] + [
            charts.build_phase_breakdown(results), charts.build_memory_breakdown(results),
            charts.build_sweep_lines(results, "batch")]
        return [(len(fig.data), len(fig.layout.annotations)) for fig in figures]

    assert sizes(2) == sizes(300)
    many = charts.build_throughput([make_result("timeout", batch=b) for b in range(1, 301)]).to_dict()
    [bar] = _bars(many)
    assert len(bar["x"]) == 300 and set(bar["text"]) == {"TIMEOUT"}


def test_text_from_runs_reaches_a_figure_escaped():
    # plotly draws <a href>, <b>... in names, labels, hover text and titles: text from a file
    # must be drawn as written.
    link = '<a href="https://example.invalid">x</a>'
    env = dataclasses.replace(CPU_ENV, device_name=f"{link} & co")
    results = [make_result(env=env, batch=2, model="<b>m</b>:build"), make_result(batch=2, model="mod:build"),
               make_result("oom", env=env, batch=4).replace(error=f"<img src='https://example.invalid/p.png'> {link}")]
    figures = [build(results).to_dict() for build in charts.MAIN_CHARTS] + [
        charts.build_sweep_lines(results, "model").to_dict(), charts.build_phase_breakdown(results).to_dict()]
    text = str(figures)
    assert "<a href" not in text and "<img" not in text and "<b>m" not in text
    assert "&lt;a href=\"https://example.invalid\"&gt;x&lt;/a&gt; &amp; co" in text  # the legend's device
    assert "&lt;img src=" in text and "&lt;b&gt;m&lt;/b&gt;:build" in text  # the error, the model on the axis
    assert common.chart_text("a < b & c > d") == "a &lt; b &amp; c &gt; d"


def test_one_encoding_colour_per_precision_pattern_per_checkpointing_on_every_per_run_chart():
    results = [make_result(batch=2, precision=p, ckpt=c) for p in ("fp32", "bf16") for c in ("none", "full")]
    for build in charts.MAIN_CHARTS:
        bars = {bar["name"]: bar["marker"] for bar in _bars(build(results).to_dict())}
        assert set(bars) == {"fp32", "fp32 · ckpt full", "bf16", "bf16 · ckpt full"}
        assert bars["fp32 · ckpt full"]["color"] == bars["fp32"]["color"] == common.PRECISION_COLORS["fp32"]
        assert bars["bf16 · ckpt full"]["color"] == common.PRECISION_COLORS["bf16"]
        assert bars["bf16 · ckpt full"]["pattern"]["shape"] == "/" and bars["bf16"]["pattern"]["shape"] == ""
    assert len(set(common.CKPT_PATTERNS.values())) == len(common.CKPT_PATTERNS)


def test_the_palette_has_no_red_green_pair():
    # Deuteranopes confuse pure reds and greens: the failed/ok pair and every precision colour
    # come from the Okabe-Ito set, which has neither plotly's red nor its green.
    used = {common.FAILED_COLOR, common.OK_COLOR, common.FIT_COLOR, common.ANALYTIC_COLOR,
            common.BUDGET_COLOR, *common.PRECISION_COLORS.values()}
    assert not used & {"#d62728", "#2ca02c", "red", "green"}
    assert len(set(common.PRECISION_COLORS.values())) == len(common.PRECISION_COLORS)


@pytest.mark.parametrize("build", [charts.build_throughput, charts.build_backward_time])
def test_every_chart_says_what_its_error_bars_are(build):
    results = [make_result(batch=b) for b in (2, 4)]
    subtitle = build(results).to_dict()["layout"]["title"]["subtitle"]["text"]
    assert f"Error bars: 10th–90th percentile of {results[0].config.steps} measured steps" in subtitle


def test_throughput_unit_can_be_chosen():
    results = [make_result(batch=2)]
    fig = charts.build_throughput(results, unit="samples/s").to_dict()
    assert fig["layout"]["yaxis"]["title"]["text"] == "samples/s"
    assert _bars(fig)[0]["y"][0] == pytest.approx(results[0].metrics.samples_per_s)
