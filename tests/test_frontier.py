"""Frontier and recommender: Pareto frontier, recommendation against brute force (including
"nothing fits"), run selection, missing candidates and the `recommend` command."""
import dataclasses
import json
import random

import pytest

from engine import cli, frontier
from engine.config import GIB, BenchConfig
from engine.results import Result, write_jsonl
from tests.factories import H100_ENV, make_result, with_metrics

TINY = {"n_layers": 2, "seq_len": 32, "d_model": 64, "n_heads": 2, "vocab": 256}


def run(status="ok", samples_per_s=100.0, peak_gib=1.0, env=None, **fields):
    """A gpt-tiny result with chosen throughput and peak (GiB)."""
    result = make_result(status, env=env or H100_ENV, **{"model": "gpt-tiny", **fields})
    if status == "ok":
        result = with_metrics(result, samples_per_s=samples_per_s, peak_allocated_bytes=int(peak_gib * GIB))
    return result


def random_runs(rng: random.Random, n: int) -> list[Result]:
    out = []
    for _ in range(n):
        batch = rng.choice([1, 2, 4, 8])
        out.append(run(
            status=rng.choice(["ok"] * 5 + ["oom"]),
            samples_per_s=rng.choice([50.0, 100.0, 150.0, 200.0, 250.0]),
            peak_gib=rng.choice([10, 20, 30, 40, 50, 60, 70, 79]),
            batch=batch, accum=rng.choice([1, 2, 4, 8]) if batch < 8 else 1,
            precision=rng.choice(["fp32", "bf16"]), ckpt=rng.choice(["none", "full"]),
        ))
    return out


# ------------------------------------------------------------------------- frontier
def test_pareto_frontier_matches_a_brute_force_dominance_check():
    rng = random.Random(0)
    for _ in range(30):
        runs = random_runs(rng, 12)
        ok = frontier.measured(runs)
        front = frontier.pareto_frontier(runs)

        def dominated(r):
            p, t = r.metrics.peak_allocated_bytes, r.metrics.samples_per_s
            return any(o is not r and o.metrics.peak_allocated_bytes <= p and o.metrics.samples_per_s >= t
                       and (o.metrics.peak_allocated_bytes, o.metrics.samples_per_s) != (p, t) for o in ok)

        expected = {(r.metrics.peak_allocated_bytes, r.metrics.samples_per_s) for r in ok if not dominated(r)}
        got = [(r.metrics.peak_allocated_bytes, r.metrics.samples_per_s) for r in front]
        assert set(got) == expected and len(got) == len(expected)  # duplicates kept once
        assert got == sorted(got)  # increasing memory, and so increasing throughput
        assert all(a[1] < b[1] for a, b in zip(got, got[1:]))
        assert all(r.status == "ok" for r in front)


# ------------------------------------------------------------------------- recommender
def test_recommend_matches_brute_force_including_nothing_fits():
    rng = random.Random(1)
    nothing_fits_seen = fits_seen = 0
    for _ in range(60):
        runs = random_runs(rng, 10)
        effective = rng.choice([4, 8])
        budget = rng.choice([5, 25, 45, 80])
        answer = frontier.recommend(runs, effective, budget)
        candidates = [r for r in runs if r.status == "ok" and r.metrics.effective_batch == effective]
        fitting = [r for r in candidates if r.metrics.peak_allocated_bytes <= budget * GIB]
        if not fitting:
            nothing_fits_seen += 1
            assert not answer["fits"] and answer["best"] is None and answer["runner_up"] is None
            assert "Nothing" in answer["answer"]
            if candidates:
                least = min(r.metrics.peak_allocated_bytes for r in candidates)
                assert answer["closest"]["peak_allocated_bytes"] == least
            else:
                assert answer["closest"] is None
            continue
        fits_seen += 1
        # Brute force: the best is a fitting run no other fitting run beats.
        best = answer["best"]
        assert best["samples_per_s"] == max(r.metrics.samples_per_s for r in fitting)
        assert best["margin_bytes"] == budget * GIB - best["peak_allocated_bytes"] >= 0
        ordered = sorted((r.metrics.samples_per_s for r in fitting), reverse=True)
        if len(fitting) > 1:
            assert answer["runner_up"]["samples_per_s"] == ordered[1]
            assert answer["runner_up"]["id"] != best["id"]
        else:
            assert answer["runner_up"] is None
        assert best["id"] in {r.id for r in fitting}
    assert nothing_fits_seen and fits_seen


def test_answer_in_words():
    runs = [
        run(samples_per_s=1930, peak_gib=61.2, batch=8, accum=4, precision="bf16", ckpt="every-k", k=2),
        run(samples_per_s=1500, peak_gib=40, batch=16, accum=2, precision="bf16", ckpt="full"),
        run(samples_per_s=3000, peak_gib=90, batch=32, accum=1, precision="bf16"),
    ]
    answer = frontier.recommend(runs, 32, 80)
    assert answer["answer"].startswith(
        "Best: batch 8 × accum 4, bf16, checkpointing every 2nd block: 1,930 samples/s at 61.2 GiB of 80 GiB.")
    assert "Runner-up: batch 16 × accum 2, bf16, full checkpointing: 1,500 samples/s at 40 GiB of 80 GiB (22.3% slower)" \
        in answer["answer"]
    assert answer["best"]["config"]["batch"] == 8 and answer["over_budget"] == 1
    assert not answer["too_close_to_call"] and "Too close" not in answer["answer"]


def _spread(result, iqr_rel, p10, p90):
    step = dataclasses.replace(result.metrics.step_ms, p10=result.metrics.step_ms.median * p10,
                               p90=result.metrics.step_ms.median * p90, iqr_rel=iqr_rel)
    return with_metrics(result, step_ms=step)


def test_close_throughputs_keep_their_digits_and_are_too_close_to_call():
    a = _spread(run(samples_per_s=4.31, peak_gib=1, batch=2, accum=2), 0.03, 0.97, 1.05)
    b = _spread(run(samples_per_s=3.72, peak_gib=1, batch=4, accum=1), 0.03, 0.97, 1.05)
    words = frontier.recommend([a, b], 4, 80)["answer"]
    assert "4.31 samples/s" in words and "3.72 samples/s" in words and "(13.7% slower)" in words
    assert "Too close" not in words  # 4.10–4.44 and 3.54–3.84 do not overlap
    c = _spread(run(samples_per_s=4.20, peak_gib=1, batch=1, accum=4), 0.05, 0.9, 1.1)
    answer = frontier.recommend([a, c], 4, 80)
    assert answer["too_close_to_call"] and "Too close to call" in answer["answer"]


def test_a_noisy_winner_within_a_steady_runners_spread_gives_way():
    noisy = _spread(run(samples_per_s=105, peak_gib=1, batch=2, accum=2), 0.4, 0.6, 1.5)
    steady = _spread(run(samples_per_s=100, peak_gib=1, batch=4, accum=1), 0.02, 0.98, 1.02)
    answer = frontier.recommend([noisy, steady], 4, 80)
    assert answer["best"]["id"] == steady.id and answer["too_close_to_call"]
    assert "(noisy: step time varies more than 10 %)" in answer["answer"]


def test_runs_of_several_models_or_environments_need_a_choice():
    runs = [run(batch=1), run(batch=1, overrides=TINY), run(batch=1, env=dataclasses.replace(H100_ENV, device_name="NVIDIA A100"))]
    with pytest.raises(frontier.SelectionError, match="several models"):
        frontier.recommend(runs, 1, 80)
    with pytest.raises(frontier.SelectionError, match="several environments") as info:
        frontier.recommend(runs, 1, 80, model="gpt-tiny")  # the exact label: runs 0 and 2
    assert f"[{runs[2].environment_id}]" in str(info.value)  # the id to pass as --env
    assert frontier.recommend(runs, 1, 80, model="gpt-tiny", env=runs[2].environment_id)["best"]["id"] == runs[2].id
    answer = frontier.recommend(runs, 1, 80, model=runs[1].config.model_label)
    assert answer["best"]["id"] == runs[1].id
    with pytest.raises(frontier.SelectionError, match="no runs of model"):
        frontier.recommend(runs, 1, 80, model="gpt-xl")


def test_missing_candidates_are_the_unmeasured_configs_that_could_fit():
    runs = [
        run(batch=2, accum=4, precision="fp32", samples_per_s=100, peak_gib=10),
        run(batch=4, accum=2, precision="bf16", samples_per_s=150, peak_gib=50),
        run("oom", batch=8, accum=1, precision="fp32"),
    ]
    missing = frontier.missing_candidates(runs, 8, 40)
    got = sorted((c.precision, c.batch, c.accum) for c in missing)
    # fp32: batches 1 and 4 unmeasured (8 ran out of memory); bf16: 1 and 2 (4 is over the
    # 40 GiB budget, so 8 would be too).
    assert got == [("bf16", 1, 8), ("bf16", 2, 4), ("fp32", 1, 8), ("fp32", 4, 2)]
    assert all(c.model == "gpt-tiny" and c.effective_batch == 8 for c in missing)


def test_config_words():
    assert BenchConfig(batch=4, accum=1, precision="fp32", ckpt="none").describe(with_model=False) == \
        "batch 4 × accum 1, fp32, no checkpointing"
    config = BenchConfig(batch=1, accum=2, precision="fp16", ckpt="every-k", k=3, optimizer="sgd")
    assert config.describe(with_model=False) == "batch 1 × accum 2, fp16, checkpointing every 3rd block, sgd"
    assert config.replace(overrides={"n_layers": 2}).describe() == \
        "gpt-tiny (n_layers=2), batch 1 × accum 2, fp16, checkpointing every 3rd block, sgd"


# ------------------------------------------------------------------------- the command
def exit_code(argv: list[str]) -> int:
    """cli.main's exit code, also for argparse errors (which exit through SystemExit)."""
    try:
        return cli.main(argv)
    except SystemExit as exc:
        return exc.code


def test_recommend_command(tmp_path, capsys):
    path = tmp_path / "runs.jsonl"
    runs = [run(samples_per_s=s, peak_gib=p, batch=b, accum=8 // b)
            for s, p, b in ((100, 10, 1), (180, 30, 2), (300, 70, 8))]
    write_jsonl(path, runs)
    assert cli.main(["recommend", "--results", str(path), "--effective-batch", "8", "--memory-budget-gib", "40",
                     "--json"]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert answer["best"]["id"] == runs[1].id and answer["runner_up"]["id"] == runs[0].id
    assert {c["batch"] for c in answer["missing_candidates"]} == {4}
    assert cli.main(["recommend", "--results", str(path), "--effective-batch", "8", "--memory-budget-gib", "5"]) == 1
    assert capsys.readouterr().out.startswith("Nothing measured at effective batch 8 fits 5 GiB. Closest: batch 1")


@pytest.mark.parametrize("args, message", [
    (["--effective-batch", "8", "--memory-budget-gib", "40"], "needs --results FILE or --db PATH"),
    (["--results", "RUNS", "--effective-batch", "0", "--memory-budget-gib", "40"], "--effective-batch"),
    (["--results", "RUNS", "--effective-batch", "8", "--memory-budget-gib", "-1"], "--memory-budget-gib"),
    (["--db", "/nonexistent/runs.sqlite", "--effective-batch", "8", "--memory-budget-gib", "1"], "no such database"),
    (["--results", "RUNS", "--effective-batch", "x", "--memory-budget-gib", "1"], "invalid int value"),
])
def test_recommend_command_bad_input_is_one_line_and_exit_2(tmp_path, capsys, args, message):
    path = tmp_path / "runs.jsonl"
    write_jsonl(path, [run(batch=1), run(batch=1, overrides=TINY)])
    assert exit_code(["recommend", *[str(path) if a == "RUNS" else a for a in args]]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_recommend_command_names_the_models_to_choose_from(tmp_path, capsys):
    path = tmp_path / "runs.jsonl"
    write_jsonl(path, [run(batch=1), run(batch=1, overrides=TINY)])
    assert cli.main(["recommend", "--results", str(path), "--effective-batch", "1", "--memory-budget-gib", "80"]) == 2
    assert "several models" in capsys.readouterr().err


HERE = "this-machine"


def _on(result, host, origin="here"):
    return result.replace(env=dataclasses.replace(result.env, host_id=host), origin=origin)


def test_demo_and_imported_runs_never_pass_for_this_machines():
    # The demo bundle was recorded on a CPU with the same name as this one, and is 8× faster.
    local = [_on(run(samples_per_s=s, peak_gib=1, batch=b, accum=4 // b), HERE) for s, b in ((10, 1), (12, 2))]
    demo = [_on(run(samples_per_s=s, peak_gib=1, batch=b, accum=4 // b), "elsewhere", "demo") for s, b in ((90, 1), (95, 4))]
    imported = [_on(run(samples_per_s=80, peak_gib=1, batch=4), "teammate", "imported")]
    answer = frontier.recommend(local + demo + imported, 4, 80, host_id=HERE)
    assert answer["best"]["id"] == local[1].id and "measured here" in answer["environment"]
    # Without runs measured here, the input must hold one environment, or the caller picks.
    with pytest.raises(frontier.SelectionError, match="several environments"):
        frontier.recommend(demo + imported, 4, 80, host_id=HERE)
    picked = frontier.recommend(demo + imported, 4, 80, env=demo[0].environment_id, host_id=HERE)
    assert picked["best"]["id"] == demo[1].id and "demo data" in picked["environment"]


def test_an_environment_is_its_origin_and_fingerprint():
    base = run(batch=1)
    assert base.environment_id == run(batch=2).environment_id
    for changed in (base.replace(origin="imported"), base.replace(env=dataclasses.replace(base.env, torch="2.14.0")),
                    base.replace(env=dataclasses.replace(base.env, cpu_threads=8)),
                    base.replace(env=dataclasses.replace(base.env, gpu_uuid="GPU-other"))):
        assert changed.environment_id != base.environment_id
    # The load when a run started is recorded, but two runs of one machine stay one environment.
    assert base.replace(env=dataclasses.replace(base.env, load_avg=3.5)).environment_id == base.environment_id


def test_recommend_on_a_database_holding_demo_and_local_runs_answers_from_the_local_ones(tmp_path, capsys):
    from engine.devices import this_host_id
    from engine.store import Store

    db = str(tmp_path / "runs.sqlite")
    local = [_on(run(samples_per_s=s, peak_gib=1, batch=b, accum=4 // b), this_host_id()) for s, b in ((10, 1), (12, 2))]
    demo = [_on(run(samples_per_s=90, peak_gib=1, batch=4), "elsewhere", "demo")]
    Store(db).add_many(local + demo)
    args = ["recommend", "--db", db, "--effective-batch", "4", "--memory-budget-gib", "80"]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "12" in out and "90" not in out.splitlines()[0]
    assert f"From the runs of: {local[0].environment_words}" in out
    assert cli.main([*args, "--env", demo[0].environment_id, "--json"]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert answer["best"]["id"] == demo[0].id and "demo data" in answer["environment"]
    assert cli.main([*args, "--env", "nosuchid"]) == 2
    assert "nosuchid" in capsys.readouterr().err
