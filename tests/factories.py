"""Synthetic results for tests: built with the engine's own ``Result.new``, so they stay
valid if the schema grows. Benchmarks that must be real use the engine instead."""
from __future__ import annotations

import dataclasses

from engine.config import GIB, BenchConfig
from engine.results import Env, MemoryBreakdown, Metrics, Result
from engine.stats import Summary

TEST_HOST = "test-host"
CPU_ENV = Env(device_type="cpu", device_name="Test CPU", capacity_bytes=16 * GIB, torch="2.13.0", cuda=None,
              driver=None, python="3.11.7", cpu="Test CPU", host_id=TEST_HOST, cpu_threads=2)
H100_ENV = Env(device_type="cuda", device_name="NVIDIA H100 80GB HBM3", capacity_bytes=80 * GIB, torch="2.13.0",
               cuda="12.8", driver="570.00", python="3.11.7", cpu="Xeon")
PHASES = ("step_ms", "forward_ms", "backward_ms", "optimizer_ms")


def summary(median: float) -> Summary:
    """A steady spread around ``median`` (IQR 5 %)."""
    return Summary(median=median, p10=median * 0.95, p90=median * 1.1, iqr_rel=0.05)


def make_result(status: str = "ok", env: Env | None = None, sweep_id: str | None = None, **fields) -> Result:
    """A result for ``BenchConfig(**fields)`` (device cpu) with numbers that scale with batch."""
    config = BenchConfig(**{"device": "cpu", **fields})
    env = env or CPU_ENV
    if status != "ok":
        return Result.new(config, status, env, error=f"{status}: synthetic failure", sweep_id=sweep_id)
    batch = config.effective_batch
    factor = {"fp32": 1.0, "bf16": 0.6, "fp16": 0.6}[config.precision] * (1.3 if config.ckpt != "none" else 1.0)
    forward, backward, optimizer = 2.0 * batch * factor, 4.0 * batch * factor, 1.5
    step = forward + backward + optimizer
    activations = batch * 64 * 2**20 * (0.3 if config.ckpt != "none" else 1.0)
    breakdown = MemoryBreakdown(params=20 * 2**20, grads=20 * 2**20, optimizer=40 * 2**20,
                                activations=int(activations), other=2**20)
    metrics = Metrics(
        effective_batch=batch, step_ms=summary(step), forward_ms=summary(forward), backward_ms=summary(backward),
        optimizer_ms=summary(optimizer), samples_per_s=batch / step * 1000, tokens_per_s=batch * 128 / step * 1000,
        peak_allocated_bytes=breakdown.total, memory_breakdown_bytes=breakdown, flops_per_step=int(1e9 * batch),
        hw_flops_per_step=int(1.3e9 * batch),
    )
    samples = {key: [metrics.phase(key).median] * 3 for key in PHASES}
    return Result.new(config, status, env, metrics=metrics, samples=samples, sweep_id=sweep_id)


def make_sweep(sweep_id: str = "sweep-1", batches=(1, 2, 4), precisions=("fp32", "bf16"), oom_batch: int | None = None,
               env: Env | None = None) -> list[Result]:
    """A batch × precision sweep of gpt-tiny; ``oom_batch`` runs fail with OOM."""
    return [make_result("oom" if b == oom_batch else "ok", env=env, sweep_id=sweep_id, batch=b, precision=p)
            for p in precisions for b in batches]


def assert_valid(result: Result) -> None:
    """The result survives the trip through its JSON form unchanged (what a file or the store holds)."""
    assert Result.from_dict(result.to_dict(), "test") == result


def with_metrics(result: Result, **changes) -> Result:
    """``result`` with some metrics changed."""
    return result.replace(metrics=dataclasses.replace(result.metrics, **changes))
