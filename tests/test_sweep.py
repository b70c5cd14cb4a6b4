"""Sweeps: expanding value lists into configs, and running them past failures."""
import os

import pytest

from engine import ConfigError
from engine.sweep import axis_dimension, dimension_axis, expand, run_sweep
from engine.worker import shared_worker
from tests.factories import assert_valid

CPU = {"device": "cpu"}


def test_cross_product_of_any_fields():
    configs, notes = expand({**CPU, "model": "mlp", "steps": 2}, {"batch": [1, 2], "precision": ["fp32", "bf16"], "ckpt": ["none", "full", "every-k"]})
    assert len(configs) == 12 and notes == []
    assert {(c.batch, c.precision, c.ckpt) for c in configs} == {
        (b, p, k) for b in (1, 2) for p in ("fp32", "bf16") for k in ("none", "full", "every-k")}
    assert all(c.model == "mlp" and c.steps == 2 for c in configs)


def test_model_dimension_lists_merge_into_overrides():
    configs, _ = expand({**CPU, "overrides": {"n_layers": 2}}, {"overrides.seq_len": [32, 64]})
    assert [c.overrides for c in configs] == [{"n_layers": 2, "seq_len": 32}, {"n_layers": 2, "seq_len": 64}]


def test_model_dimensions_are_axes_crossed_with_fields_and_the_effective_batch():
    grid = {dimension_axis("seq_len"): [16, 32], dimension_axis("n_layers"): [1, 2], "batch": [1, 2, 3],
            "precision": ["fp32", "bf16"]}
    configs, notes = expand({**CPU, "overrides": {"d_model": 64, "n_heads": 2}}, grid, effective_batch=4)
    assert len(configs) == 2 * 2 * 2 * 2  # batch 3 does not divide 4
    assert notes == ["batch 3 skipped: does not divide effective batch 4"]
    assert {(c.overrides["seq_len"], c.overrides["n_layers"], c.batch, c.accum, c.precision) for c in configs} == {
        (t, n, b, 4 // b, p) for t in (16, 32) for n in (1, 2) for b in (1, 2) for p in ("fp32", "bf16")}
    assert all(c.overrides["d_model"] == 64 and c.overrides["n_heads"] == 2 for c in configs)
    assert axis_dimension(dimension_axis("seq_len")) == "seq_len" and axis_dimension("batch") is None


def test_a_hugging_face_models_own_config_keys_are_sweep_axes():
    base = {**CPU, "model": "hf:llama-3.2-1b", "overrides": {"hidden_size": 64, "num_attention_heads": 4,
                                                             "num_key_value_heads": 2, "intermediate_size": 128}}
    configs, _ = expand(base, {dimension_axis("num_hidden_layers"): [1, 2], dimension_axis("seq_len"): [16, 32]})
    assert {(c.overrides["num_hidden_layers"], c.overrides["seq_len"]) for c in configs} == {
        (n, t) for n in (1, 2) for t in (16, 32)}
    with pytest.raises(ConfigError) as info:  # a gpt preset's key, not this architecture's
        expand(base, {dimension_axis("n_layers"): [1, 2]})
    assert info.value.field == "overrides.n_layers"


@pytest.mark.parametrize("base, grid, field, value", [
    (CPU, {"overrides.wings": [1, 2]}, "overrides.wings", 1),  # not a dimension of gpt-tiny
    ({**CPU, "model": "mlp"}, {"overrides.seq_len": [8, 16]}, "overrides.seq_len", 8),  # a gpt dimension, not mlp's
    (CPU, {"overrides.seq_len": [16, 0]}, "overrides.seq_len", 0),
    (CPU, {"overrides.seq_len": [16, "x"]}, "overrides.seq_len", "x"),
    (CPU, {"overrides.seq_len": []}, "overrides.seq_len", []),
    (CPU, {"overrides.": [1, 2]}, "overrides.", [1, 2]),
    (CPU, {"overrides.d_model": [64, 100], "overrides.n_heads": [2, 3]}, "overrides.n_heads", 3),
])
def test_a_bad_model_dimension_axis_names_the_key_and_the_value(base, grid, field, value):
    with pytest.raises(ConfigError) as info:
        expand(base, grid)
    assert (info.value.field, info.value.value) == (field, value)


def test_a_dimension_axis_counts_toward_the_sweep_limit(monkeypatch):
    monkeypatch.setenv("TRADEOFF_LAB_MAX_SWEEP", "7")
    with pytest.raises(ConfigError, match="8 configurations"):
        expand(CPU, {"overrides.seq_len": [16, 32], "overrides.n_layers": [1, 2], "batch": [1, 2]})


def test_effective_batch_sets_accum_and_skips_non_divisors():
    configs, notes = expand(CPU, {"batch": [1, 2, 3, 4, 8, 16]}, effective_batch=8)
    assert [(c.batch, c.accum) for c in configs] == [(1, 8), (2, 4), (4, 2), (8, 1)]
    assert all(c.effective_batch == 8 for c in configs)
    assert notes == ["batch 3 skipped: does not divide effective batch 8",
                     "batch 16 skipped: does not divide effective batch 8"]


@pytest.mark.parametrize("base, grid, effective_batch, field", [
    (CPU, {"batchsize": [1, 2]}, None, "batchsize"),
    (CPU, {"batch": []}, None, "batch"),
    (CPU, {"batch": [1, 0]}, None, "batch"),
    (CPU, {"precision": ["fp32", "fp8"]}, None, "precision"),
    (CPU, {"accum": [1, 2]}, 8, "accum"),
    (CPU, {"batch": [1, 2]}, 0, "effective_batch"),
])
def test_bad_sweeps_name_the_field(base, grid, effective_batch, field):
    with pytest.raises(ConfigError) as info:
        expand(base, grid, effective_batch)
    assert info.value.field == field


def test_sweep_continues_past_oom_with_one_sweep_id():
    configs, _ = expand({**CPU, "model": "tests.helper_models:oom_above_2", "warmup": 1, "steps": 2}, {"batch": [1, 4, 2]})
    events, seen = [], []
    results = run_sweep(configs, events.append, seen.append)
    assert [r.status for r in results] == ["ok", "oom", "ok"]
    assert seen == results
    assert len({r.sweep_id for r in results}) == 1 and results[0].sweep_id
    assert "micro-batch 4 > 2" in results[1].error
    for r in results:
        assert_valid(r)
    assert {e.index for e in events} == {1, 2, 3} and {e.count for e in events} == {3}
    assert all(e.total == 2 for e in events if e.phase == "measure")  # the phase's own total is kept
    # run_sweep without a worker uses the shared warm worker, which is still alive (the
    # failed config's process was replaced by the last config's).
    assert shared_worker("cpu").pid not in (None, os.getpid())
