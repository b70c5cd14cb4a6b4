"""run_benchmark end to end: a complete result, attribution, fp16 bookkeeping, and on CUDA
the allocator figures, the GradScaler path and the memory cap."""
import time

import pytest
import torch
import torch.nn as nn

from engine import BenchConfig, models, results
from engine.devices import this_host_id
from engine.measure import _skipped_steps, run_benchmark
from tests.factories import assert_valid
from tests.test_step import TINY


def tiny_config(**changes):
    base = dict(model="gpt-tiny", overrides=TINY, batch=2, accum=2, warmup=1, steps=3, device="cpu")
    return BenchConfig(**{**base, **changes})


def test_gpt_tiny_result_is_schema_complete():
    events = []
    config = tiny_config()
    result = run_benchmark(config, events.append)

    assert_valid(result)
    assert result.status == "ok" and result.error is None
    assert result.config == config
    assert set(results.ENV_KEYS) == set(result.env.to_dict())
    assert result.env.device_type == "cpu" and result.env.torch == torch.__version__
    assert result.env.cpu and result.env.python
    # The fingerprint that tells this machine's runs from a teammate's or the demo's.
    assert result.env.host_id == this_host_id() and result.env.cpu_threads == torch.get_num_threads()
    assert result.env.gpu_uuid is None and result.env.load_avg is not None and result.origin == "here"

    m = result.metrics
    assert set(results.METRIC_KEYS) == set(m.to_dict())
    assert m.effective_batch == 4
    for key in ("step_ms", "forward_ms", "backward_ms", "optimizer_ms"):
        summary = m.phase(key)
        assert summary.p10 <= summary.median <= summary.p90
        assert len(result.samples[key]) == config.steps
        assert summary.median > 0
    # the phases add up to the step, sample by sample
    for i in range(config.steps):
        parts = sum(result.samples[k][i] for k in ("forward_ms", "backward_ms", "optimizer_ms"))
        assert parts == pytest.approx(result.samples["step_ms"][i])
    assert m.samples_per_s == pytest.approx(4 / (m.step_ms.median / 1000))
    assert m.tokens_per_s == pytest.approx(m.samples_per_s * TINY["seq_len"])

    breakdown = m.memory_breakdown_bytes
    assert set(breakdown.to_dict()) == {"params", "grads", "optimizer", "activations", "other"}
    assert m.peak_allocated_bytes == breakdown.total  # CPU: the instrumented step's peak
    n_params = models.count_params(models.build("gpt-tiny", TINY)[0])
    assert breakdown.params == 4 * n_params
    assert breakdown.optimizer >= 2 * 4 * n_params  # AdamW: two fp32 moments per parameter
    assert breakdown.activations > 0

    assert m.flops_per_step == m.hw_flops_per_step > 0
    assert m.grad_rel_diff == 0.0  # fp32 without checkpointing is its own baseline
    # CPU: no allocator reservation, no NVML, no peak table, no loss scaling
    for key in ("peak_reserved_bytes", "nvml_used_bytes", "mfu", "energy_j_per_sample", "loss_scale", "skipped_steps"):
        assert getattr(m, key) is None, key

    phases = [e.phase for e in events]
    assert phases[0] == "build" and phases[-1] == "numerics"
    measure = [e for e in events if e.phase == "measure"]
    assert [(e.step, e.total) for e in measure] == [(1, 3), (2, 3), (3, 3)]
    assert [e.step for e in events if e.phase == "warmup"] == [1]
    assert "breakdown" in phases


def test_backward_sleep_lands_in_backward_median():
    config = BenchConfig(model="tests.test_step:build_sleepy", batch=4, warmup=1, steps=3, device="cpu")
    m = run_benchmark(config).metrics
    assert m.backward_ms.median >= 45
    assert m.forward_ms.median < 15
    assert m.tokens_per_s is None  # no sequence length


class Overflowing(nn.Module):
    """fp16 loss that is always inf: every step must be skipped by GradScaler."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 1)

    def forward(self, x):
        return self.fc(x).sum() * 1e30


def build_overflowing():
    return Overflowing(), lambda batch_size, device: (torch.randn(batch_size, 4, device=device),)


def test_fp16_skipped_steps_and_final_loss_scale():
    config = BenchConfig(model="tests.test_measure:build_overflowing", precision="fp16", batch=2, warmup=1, steps=3, device="cpu")
    result = run_benchmark(config)
    m = result.metrics
    assert m.skipped_steps == 3
    # scale halves on each of the 1 warm-up + 3 timed skipped steps
    assert m.loss_scale == 65536.0 / 2**4
    assert any("skipped by GradScaler" in w for w in result.warnings)


def test_fp16_finite_run_reports_scale_and_no_skips():
    m = run_benchmark(tiny_config(precision="fp16", accum=1)).metrics
    assert m.loss_scale == 65536.0 and m.skipped_steps == 0


def test_skipped_steps_counts_scale_decreases():
    assert _skipped_steps([65536.0, 65536.0, 32768.0, 32768.0, 65536.0, 16384.0]) == 2
    assert _skipped_steps([1024.0]) == 0


class Jittery(nn.Module):
    """Forward alternates between 2 ms and 20 ms: a noisy forward phase."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(2, 1)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        time.sleep(0.002 if self.calls % 2 else 0.02)
        return self.fc(x).sum()


def build_jittery():
    return Jittery(), lambda batch_size, device: (torch.randn(batch_size, 2, device=device),)


def test_noisy_phase_gives_warning():
    result = run_benchmark(BenchConfig(model="tests.test_measure:build_jittery", batch=1, warmup=0, steps=6, device="cpu"))
    assert result.metrics.forward_ms.iqr_rel > 0.10
    assert any(w.startswith("forward time varies by ") and "treat with care" in w for w in result.warnings)


# ------------------------------------------------------------------------------ CUDA only
GPU_TINY = {"n_layers": 2, "seq_len": 128, "d_model": 128, "n_heads": 4, "vocab": 1024}


@pytest.mark.gpu
def test_peak_allocated_matches_hand_written_loop():
    from engine.selfcheck import hand_loop_peak

    config = BenchConfig(model="gpt-tiny", overrides=GPU_TINY, batch=8, warmup=2, steps=4, device="cuda")
    engine_peak = run_benchmark(config).metrics.peak_allocated_bytes
    torch.cuda.empty_cache()
    assert abs(engine_peak - hand_loop_peak(config)) <= 2**20


@pytest.mark.gpu
def test_cuda_result_has_allocator_figures_and_events_timing():
    result = run_benchmark(BenchConfig(model="gpt-tiny", overrides=GPU_TINY, batch=8, warmup=2, steps=4, device="cuda"))
    m = result.metrics
    assert result.env.device_type == "cuda" and result.env.cuda
    assert m.peak_reserved_bytes >= m.peak_allocated_bytes > 0
    assert m.memory_breakdown_bytes.total > 0
    assert m.allocator_retries == 0
    assert m.flops_per_step > 0
    from engine.flops import peak_row

    assert (m.mfu is not None) == (peak_row(result.env.device_name) is not None)


@pytest.mark.gpu
def test_cuda_backward_work_is_attributed_to_backward():
    # 50 ms of calibrated GPU work in backward. Host timing would put this time wherever the
    # host first waits for the GPU; CUDA events put it in backward, where the GPU spends it.
    from engine.selfcheck import SLEEP_MS

    config = BenchConfig(model="engine.selfcheck:sleepy_backward", batch=4, warmup=1, steps=3, device="cuda")
    m = run_benchmark(config).metrics
    assert m.backward_ms.median >= 0.9 * SLEEP_MS
    assert m.forward_ms.median < 10


@pytest.mark.gpu
def test_fp16_grad_scaler_path_on_cuda():
    m = run_benchmark(BenchConfig(model="gpt-tiny", overrides=GPU_TINY, batch=8, precision="fp16", warmup=2, steps=4, device="cuda")).metrics
    assert m.loss_scale is not None and m.loss_scale > 0
    assert m.skipped_steps is not None and 0 <= m.skipped_steps <= 4


@pytest.mark.gpu
def test_memory_cap_on_cuda_gives_oom_and_is_reset():
    capped = BenchConfig(model="gpt-small", batch=16, warmup=1, steps=1, device="cuda", memory_cap_gib=0.5)
    with pytest.raises(Exception) as info:
        run_benchmark(capped)
    status, message = results.classify_exception(info.value)
    assert status == "oom", message
    del info
    # the cap is lifted afterwards: the same process can allocate more than 0.5 GiB again
    big = torch.empty(int(0.75 * 2**30), dtype=torch.uint8, device="cuda")
    del big
    assert run_benchmark(BenchConfig(model="gpt-tiny", overrides=GPU_TINY, batch=2, warmup=1, steps=1, device="cuda")).status == "ok"
