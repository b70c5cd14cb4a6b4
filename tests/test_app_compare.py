"""Compare page: the latest sweep by default, failed runs as placeholders, environments, diff."""
import dataclasses

from app import ui
from tests.app_fixtures import (H100_ENV, app_db, chart, chart_titles, make_result, make_sweep, open_app,  # noqa: F401
                                with_metrics)

MAIN_CHARTS = ["Throughput", "Peak memory", "Backward time"]


def test_compare_without_runs_says_what_to_do(app_db):
    at = open_app("views/compare.py")
    assert "No runs stored yet" in at.info[0].value


def test_the_latest_sweep_with_an_oom_run_among_ok_runs(app_db):
    app_db.add_many(make_sweep("older", batches=(1, 2)))
    latest = make_sweep("latest", batches=(1, 2, 4), oom_batch=4)
    app_db.add_many(latest)
    at = open_app("views/compare.py")
    assert at.selectbox(key="compare.source").value == "latest"
    assert chart_titles(at)[:5] == MAIN_CHARTS + ["Phase breakdown", "Memory breakdown"]
    assert "Throughput vs batch" in chart_titles(at)
    for title in MAIN_CHARTS:
        figure = chart(at, title)
        bars = [t for t in figure["data"] if t["type"] == "bar"]
        assert sum(len(t["x"]) for t in bars) == 6  # every run, grouped by batch
        failed = [(x, text) for t in bars for x, text in zip(t["x"], t["text"]) if text == "OOM"]
        assert failed == [("b4", "OOM"), ("b4", "OOM")]
    assert "2 run(s) did not finish" in at.expander[0].label and "OOM" in at.expander[0].label
    [caption] = [c.value for c in at.caption if c.value.startswith("Measured on:")]
    assert "Test CPU, 2 threads, torch 2\\.13\\.0 · measured here" in caption  # Markdown-escaped


def test_a_seq_len_sweep_is_compared_against_seq_len_with_one_line_per_precision(app_db):
    seq_lens = (32, 64, 128)
    app_db.add_many([make_result(sweep_id="dims", batch=2, precision=p, overrides={"n_layers": 2, "seq_len": t})
                     for p in ("fp32", "bf16") for t in seq_lens])
    at = open_app("views/compare.py")
    assert at.selectbox(key="compare.source").value == "dims"
    assert "gpt-tiny: sweep over seq_len, precision · 6 runs" in at.selectbox(key="compare.source").options[0]
    assert at.selectbox(key="compare.sweep_field").value == "seq_len"
    lines = chart(at, "Throughput vs seq_len")
    assert [(t["name"], list(t["x"])) for t in lines["data"]] == [("fp32", list(seq_lens)), ("bf16", list(seq_lens))]
    assert lines["layout"]["xaxis"]["title"]["text"] == "seq_len (model dimension)"
    bars = [t for t in chart(at, "Throughput")["data"] if t["type"] == "bar"]
    assert [list(t["x"]) for t in bars] == [[f"seq_len {t}" for t in seq_lens]] * 2


def test_runs_from_other_devices_are_flagged_and_diffed(app_db):
    laptop, h100 = make_result(batch=8), make_result(env=H100_ENV, batch=64, precision="bf16")
    app_db.add_many([laptop, h100])
    at = open_app("views/compare.py")
    assert at.selectbox(key="compare.source").value == "Hand-picked runs"  # no sweep stored
    assert "2 different environments" in at.warning[0].value and "NVIDIA H100 80GB HBM3" in at.warning[0].value
    legend = sorted(t["name"].split(" · ")[-1] for t in chart(at, "Throughput")["data"])
    assert legend == ["NVIDIA H100 80GB HBM3", "Test CPU"]
    changes, metrics = at.dataframe[-2].value, at.dataframe[-1].value
    changed = dict(zip(changes["setting"], zip(changes["A"], changes["B"])))
    assert changed["config.batch"] == ("8", "64") and changed["env.device_name"] == ("Test CPU", "NVIDIA H100 80GB HBM3")
    row = metrics[metrics["metric"] == "effective_batch"].iloc[0]
    assert row["change %"] == 700.0


def test_runs_chosen_on_the_results_page_open_here(app_db):
    runs = make_sweep("s", batches=(1, 2, 4))
    app_db.add_many(runs)
    at = open_app("views/compare.py")
    at.session_state["compare.ids"] = [runs[0].id, runs[2].id]
    at.run()
    assert at.selectbox(key="compare.source").value == "Hand-picked runs"
    assert at.multiselect(key="compare.runs").value == [runs[0].id, runs[2].id]
    assert sum(len(t["x"]) for t in chart(at, "Throughput")["data"]) == 2


def test_numerical_cost_and_energy_sit_beside_the_gains(app_db):
    runs = [with_metrics(run, grad_rel_diff=diff, energy_j_per_sample=joules) for run, diff, joules in
            zip(make_sweep("s", batches=(2,), precisions=("fp32", "bf16", "fp16")), (0.0, 4e-3, 9e-4), (0.30, 0.18, 0.19))]
    runs[2] = with_metrics(runs[2], loss_scale=32768.0, skipped_steps=1)
    app_db.add_many(runs)
    at = open_app("views/compare.py")
    assert "Numerical cost and energy" in [s.value for s in at.subheader]
    figure = chart(at, "Numerical cost")
    assert figure["data"][0]["y"] == [0.0, 4e-3, 9e-4]
    [table] = [d.value for d in at.dataframe if "grad_rel_diff" in d.value.columns]
    bf16 = table[table["config"].str.contains("bf16")].iloc[0]
    assert bf16["speed-up"] == runs[1].metrics.samples_per_s / runs[0].metrics.samples_per_s
    assert bf16["memory saved %"] == 0.0 and bf16["J/sample"] == 0.18  # the fixture's peak ignores precision
    fp16 = table[table["config"].str.contains("fp16")].iloc[0]
    assert (fp16["loss scale"], fp16["skipped steps"]) == (32768.0, 1)


def test_presentation_mode_enlarges_fonts_and_charts(app_db):
    app_db.add_many(make_sweep("s", batches=(1, 2)))
    at = open_app("views/compare.py")
    normal = chart(at, "Throughput")["layout"]
    assert not [h for h in at.get("html") if "h1 { font-size" in h.proto.body]
    # The toggle lives in main.py's sidebar; AppTest lists it on the default page only.
    at.session_state["presentation"] = True
    at.run()
    assert not at.exception
    big = chart(at, "Throughput")["layout"]
    # Larger type, at a height that keeps three charts on a 1280×720 projector (checked in a browser).
    assert big["height"] == ui.PRESENTATION_CHART_HEIGHT and big["font"]["size"] > normal.get("font", {}).get("size", 12)
    assert [h for h in at.get("html") if "h1 { font-size" in h.proto.body]


def test_demo_runs_beside_this_machines_are_marked_with_their_origin(app_db):
    here, demo = make_result(batch=8), make_result(batch=8).replace(origin="demo")
    app_db.add_many([here, demo])
    at = open_app("views/compare.py")
    warning = at.warning[0].value
    assert "2 different environments" in warning and "demo data" in warning and "measured here" in warning
    legend = sorted(t["name"].split(" · ", 1)[-1] for t in chart(at, "Throughput")["data"])
    assert legend == ["Test CPU · demo data", "Test CPU · measured here"]  # same device name, told apart
    chosen = at.multiselect(key="compare.runs")
    assert sorted(chosen.format_func(i).split(" · ")[-1] for i in chosen.value) == ["demo data", "measured here"]
    changes = at.dataframe[-2].value
    assert dict(zip(changes["setting"], changes["B"]))["origin"] in ("demo data", "measured here")


def test_noisy_runs_are_named_and_marked(app_db):
    steady, noisy = make_sweep("s", batches=(1, 2), precisions=("fp32",))
    noisy = with_metrics(noisy, step_ms=dataclasses.replace(noisy.metrics.step_ms, iqr_rel=1.14))
    app_db.add_many([steady, noisy])
    at = open_app("views/compare.py")
    [warning] = [w.value for w in at.warning if "noisy" in w.value]
    assert "1 run(s) are noisy" in warning and "step time varies by 114% between steps" in warning and "treat with care" in warning
    [bars] = chart(at, "Throughput")["data"]
    assert list(bars["x"]) == ["b1", "b2"] and list(bars["text"]) == ["", "noisy"]


def test_the_diff_never_compares_a_run_with_itself(app_db):
    app_db.add_many(make_sweep("s", batches=(1, 2), precisions=("fp32",), oom_batch=2))
    at = open_app("views/compare.py")
    assert "Diff of two runs" in [s.value for s in at.subheader]
    assert "Only 1 of these runs finished: there is nothing to diff." in [i.value for i in at.info]
    assert not [s for s in at.selectbox if s.key in ("compare.diff_a", "compare.diff_b")]

    app_db.add_many(make_sweep("t", batches=(1, 2, 4), precisions=("fp32",)))
    at = open_app("views/compare.py")
    a, b = at.selectbox(key="compare.diff_a"), at.selectbox(key="compare.diff_b")
    assert (len(a.options), len(b.options)) == (3, 2)
    assert a.value != b.value and a.format_func(a.value) not in b.options
    a.set_value(b.value).run()  # choosing B's run as A moves B to another run
    a, b = at.selectbox(key="compare.diff_a"), at.selectbox(key="compare.diff_b")
    assert a.value != b.value
