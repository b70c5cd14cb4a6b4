"""Numerical cost: grad_rel_diff against the fp32 / no-checkpointing baseline, and the cost table."""
import math

import pytest
import torch

from engine import numerics
from engine.config import BenchConfig
from engine.measure import run_benchmark
from engine.step import build_step
from tests.factories import make_result, with_metrics

TINY = {"n_layers": 2, "seq_len": 32, "d_model": 64, "n_heads": 2, "vocab": 256}


def tiny(**fields) -> BenchConfig:
    return BenchConfig(**{"model": "gpt-tiny", "overrides": TINY, "device": "cpu", "batch": 4, **fields})


def test_identical_configs_have_zero_difference():
    value, warning = numerics.grad_rel_diff(tiny())
    assert value == 0.0 and warning is None


def test_checkpointing_recomputes_the_same_gradients_on_cpu():
    assert numerics.grad_rel_diff(tiny(ckpt="full", accum=2))[0] == 0.0


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_lower_precision_gives_a_small_nonzero_difference(precision):
    value, warning = numerics.grad_rel_diff(tiny(precision=precision))
    assert warning is None
    assert 1e-5 < value < 0.05


def test_first_step_grads_are_those_the_optimizer_applies():
    grads = numerics.first_step_grads(tiny())
    assert len(grads) == len(list(p for p in build_step(tiny()).model.parameters()))
    assert all(g.dtype == torch.float32 and g.device.type == "cpu" for g in grads)
    assert any(float(g.abs().sum()) > 0 for g in grads)


def test_rel_diff():
    ref = [torch.tensor([3.0, 0.0]), torch.tensor([4.0])]
    assert numerics.rel_diff(ref, ref) == 0.0
    assert numerics.rel_diff([torch.tensor([3.0, 0.0]), torch.tensor([5.0])], ref) == pytest.approx(0.2)
    assert math.isinf(numerics.rel_diff(ref, [torch.zeros(2), torch.zeros(1)]))


def test_a_benchmark_result_carries_grad_rel_diff():
    result = run_benchmark(tiny(precision="bf16", warmup=1, steps=2))
    assert 0 < result.metrics.grad_rel_diff < 0.05


