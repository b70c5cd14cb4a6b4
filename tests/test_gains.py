"""One speed-up per pair of runs, against a named baseline: same model, environment and
effective batch; fp32 without checkpointing, the fastest such micro-batch."""
import dataclasses

import pytest

from engine import gains
from tests.factories import H100_ENV, make_result, with_metrics


def run(speed, peak=100, **fields):
    return with_metrics(make_result(**fields), samples_per_s=speed, peak_allocated_bytes=peak)


def rows_by_id(results, candidates=None, baseline_id=None):
    return {row["id"]: row for row in gains.gain_rows(results, candidates, baseline_id)}


def test_the_baseline_is_the_fastest_fp32_no_checkpointing_micro_batch_of_the_effective_batch():
    slow_fp32 = run(70, batch=2, accum=4)
    fast_fp32 = run(100, batch=8, accum=1)
    bf16 = run(125, peak=60, batch=8, accum=1, precision="bf16")
    rows = rows_by_id([slow_fp32, fast_fp32, bf16])
    assert rows[bf16.id]["speedup"] == pytest.approx(1.25) and rows[bf16.id]["memory_saving"] == pytest.approx(0.4)
    assert rows[bf16.id]["baseline_id"] == fast_fp32.id and fast_fp32.id[:8] in rows[bf16.id]["baseline"]
    assert rows[slow_fp32.id]["speedup"] == pytest.approx(0.70)  # named: against the fastest fp32 micro-batch
    assert rows[fast_fp32.id]["speedup"] == 1.0 and rows[fast_fp32.id]["baseline"].endswith("itself")


def test_one_pair_of_runs_has_one_speed_up_whatever_else_the_page_shows():
    base, cheap = run(100, batch=4), run(125, batch=4, precision="bf16", ckpt="full")
    others = [run(90, batch=2, accum=2), run(50, batch=8, precision="bf16")]
    on_compare = rows_by_id([cheap], candidates=[base, cheap, *others])  # a hand-picked selection
    on_decide = rows_by_id([base, cheap, *others], candidates=[base, cheap, *others])  # every run of the model
    assert on_compare[cheap.id]["speedup"] == on_decide[cheap.id]["speedup"] == pytest.approx(1.25)


def test_no_speed_up_across_environments_models_or_effective_batches():
    here = run(100, batch=4)
    elsewhere = dataclasses.replace(run(400, batch=4, precision="bf16"), env=H100_ENV)
    other_model = run(50, batch=4, model="mlp", precision="bf16")
    other_batch = run(150, batch=8, precision="bf16")
    rows = rows_by_id([here, elsewhere, other_model, other_batch])
    for result in (elsewhere, other_model, other_batch):
        assert rows[result.id]["speedup"] is None and rows[result.id]["baseline"].startswith("none")


def test_a_baseline_the_user_picks():
    fp32, bf16, chosen = run(100, batch=4), run(150, batch=4, precision="bf16"), run(120, batch=4, ckpt="full")
    rows = rows_by_id([fp32, bf16, chosen], baseline_id=chosen.id)
    assert rows[bf16.id]["speedup"] == pytest.approx(1.25) and rows[bf16.id]["baseline_id"] == chosen.id
    elsewhere = run(100, batch=8)
    assert rows_by_id([elsewhere], [chosen], baseline_id=chosen.id)[elsewhere.id]["speedup"] is None
