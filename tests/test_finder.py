"""Batch finder: doubling then binary search, OOM as a result, margin, limits, best batch."""
import dataclasses
import json

import pytest

from engine import cli, finder
from engine.config import GIB, BenchConfig, device_memory_limit
from engine.devices import device_capacity_bytes
from engine.progress import Progress
from tests.factories import make_result


def fake_runner(oom_above: int, peak_per_sample: float = 0.0, speed=lambda b: 100.0 * b, status_at=None):
    """A runner that OOMs above a batch, with peak = 1 GiB + peak_per_sample × batch and
    samples/s = speed(batch); records the batches it ran."""
    calls = []

    def run(config, progress=None, cancel=None, sweep_id=None):
        calls.append(config.batch)
        if progress:
            progress(Progress("measure", 1, 1))
        status = (status_at or {}).get(config.batch) or ("oom" if config.batch > oom_above else "ok")
        result = make_result(status, batch=config.batch, sweep_id=sweep_id)
        if status == "ok":
            metrics = dataclasses.replace(result.metrics, peak_allocated_bytes=int(GIB + peak_per_sample * config.batch),
                                          samples_per_s=speed(config.batch))
            result = result.replace(metrics=metrics)
        return result

    run.calls = calls
    return run


CONFIG = BenchConfig(model="gpt-tiny", device="cpu", memory_cap_gib=8.0)


@pytest.mark.parametrize("threshold", [1, 2, 3, 5, 7, 8, 12, 37, 64, 100])
def test_finds_the_exact_oom_threshold(threshold):
    runner = fake_runner(threshold)
    report = finder.find_batch(CONFIG, max_batch=128, runner=runner)
    assert report["max_batch"] == threshold and report["exact"]
    # Doubling then bisection: about 2·log2(threshold) trials, never a batch twice.
    assert len(runner.calls) == len(set(runner.calls)) <= 2 * threshold.bit_length() + 1
    assert [t["batch"] for t in report["trials"]] == runner.calls
    assert {t["status"] for t in report["trials"] if not t["fits"]} <= {"oom"}


def test_the_margin_makes_an_ok_run_over_budget_not_fit():
    # 8 GiB cap, 5% margin: 7.6 GiB budget; peak = 1 + 0.5·b GiB fits up to b = 13.
    report = finder.find_batch(CONFIG, max_batch=64, runner=fake_runner(1000, peak_per_sample=0.5 * GIB))
    assert report["max_batch"] == 13 and report["exact"]
    assert report["budget_bytes"] == pytest.approx(0.95 * 8 * GIB) and report["capacity_bytes"] == 8 * GIB
    over = [t for t in report["trials"] if t["status"] == "ok" and not t["fits"]]
    assert over and all(t["peak_allocated_bytes"] > report["budget_bytes"] for t in over)


def test_best_batch_is_the_fastest_fitting_trial_not_the_largest():
    report = finder.find_batch(CONFIG, max_batch=64, runner=fake_runner(20, speed=lambda b: 1000 - (b - 4) ** 2))
    assert report["max_batch"] == 20 and report["best_batch"] == 4


def test_max_batch_bounds_the_search():
    runner = fake_runner(1000)
    report = finder.find_batch(CONFIG, max_batch=6, runner=runner)
    assert runner.calls == [1, 2, 4, 6] and report["max_batch"] == 6
    # Its own limit is a lower bound, never the answer: batch 7 might fit too.
    assert not report["exact"] and report["stopped"].startswith("search limit reached")


def test_the_command_says_a_limit_is_a_lower_bound(monkeypatch, capsys):
    monkeypatch.setattr(finder, "run", fake_runner(1000))
    assert cli.main(["find-batch", "--device", "cpu", "--max-batch", "64"]) == 0
    assert "Largest micro-batch that fits within" in capsys.readouterr().out
    assert cli.main(["find-batch", "--device", "cpu", "--max-batch", "64", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["max_batch"] == 64 and report["exact"] is False


def test_the_dashboard_and_the_command_share_the_defaults():
    parser = cli.build_parser()
    args = parser.parse_args(["find-batch"])
    assert (args.max_batch, args.time_limit) == (finder.DEFAULT_MAX_BATCH, finder.DEFAULT_TIME_LIMIT_S)


def test_nothing_fits():
    report = finder.find_batch(CONFIG, runner=fake_runner(0))
    assert report["max_batch"] is None and report["best_batch"] is None and not report["exact"]


def test_an_error_stops_the_search_and_says_why():
    report = finder.find_batch(CONFIG, runner=fake_runner(100, status_at={4: "error"}))
    assert report["max_batch"] == 2 and not report["exact"]
    assert report["stopped"].startswith("batch 4: error")


def test_the_time_limit_stops_the_search_with_a_lower_bound():
    now = [0.0]

    def slow(config, progress=None, cancel=None, sweep_id=None):
        now[0] += 10.0  # every trial takes 10 s
        return fake_runner(100)(config, progress, cancel, sweep_id)

    report = finder.find_batch(CONFIG, time_limit_s=25, runner=slow, clock=lambda: now[0])
    assert [t["batch"] for t in report["trials"]] == [1, 2, 4]
    assert report["max_batch"] == 4 and not report["exact"] and report["stopped"] == "time limit reached"


def test_progress_names_trial_and_batch_and_trials_share_a_sweep():
    events, stored = [], []
    report = finder.find_batch(CONFIG, max_batch=4, runner=fake_runner(100), progress=events.append,
                               on_result=stored.append)
    assert {(e.trial, e.batch) for e in events} == {(1, 1), (2, 2), (3, 4)}
    assert [r.sweep_id for r in stored] == [report["sweep_id"]] * 3
    json.dumps(report, allow_nan=False)


def test_find_batch_command_in_the_worker_against_a_model_that_ooms_above_3(tmp_path, capsys):
    out = tmp_path / "trials.jsonl"
    code = cli.main(["find-batch", "--model", "tests.decision_models:oom_above_3", "--device", "cpu",
                     "--warmup", "0", "--steps", "1", "--max-batch", "8", "--out", str(out), "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    report = json.loads(captured.out)
    assert report["max_batch"] == 3 and report["exact"]
    assert [(t["batch"], t["status"]) for t in report["trials"]] == [(1, "ok"), (2, "ok"), (4, "oom"), (3, "ok")]
    assert report["best_batch"] in (1, 2, 3)
    assert all(t["peak_allocated_bytes"] and t["samples_per_s"] for t in report["trials"] if t["status"] == "ok")
    assert len(out.read_text().splitlines()) == 4  # every trial stored
    assert "batch 4" in captured.err  # progress on stderr


def test_find_batch_command_bad_input(capsys):
    assert cli.main(["find-batch", "--max-batch", "0"]) == 2
    assert cli.main(["find-batch", "--margin", "1"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 2


def test_capacity_is_the_cap_else_the_device():
    assert device_memory_limit(CONFIG) == 8 * GIB
    assert device_memory_limit(BenchConfig(device="cpu")) == device_capacity_bytes("cpu")


def test_progress_says_which_batch_it_tries_and_the_time_left_of_its_limit():
    events = []
    finder.find_batch(CONFIG, max_batch=4, runner=fake_runner(100), progress=events.append, time_limit_s=600)
    words = events[-1].describe()
    assert words.startswith("trying batch 4 (trial 3): ") and "s left of its time limit" in words
    assert 0 < events[-1].limit_left_s <= 600
