"""The training step: accumulation, precision, timers and phase attribution."""
import time

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from engine import BenchConfig, models
from engine.step import NullTimer, PerfCounterTimer, PhaseTimer, TrainingStep, make_optimizer, make_timer

TINY = {"n_layers": 2, "seq_len": 32, "d_model": 64, "n_heads": 2, "vocab": 256}


def make_step(batch=4, accum=1, precision="fp32", ckpt="none", model="gpt-tiny", overrides=TINY, seed=0):
    config = BenchConfig(model=model, overrides=overrides, batch=batch, accum=accum, precision=precision, ckpt=ckpt, device="cpu")
    torch.manual_seed(seed)
    net, make_batch = models.build(model, overrides)
    return TrainingStep(net, make_batch, config, "cpu")


class GradCapture(PhaseTimer):
    """Copies the gradients after every backward: the last copy is what the optimizer sees."""

    def __init__(self, model):
        self.model = model
        self.grads = None

    def mark(self, phase):
        if phase == "backward":
            self.grads = [p.grad.detach().clone() for p in self.model.parameters()]


def step_grads(step):
    capture = GradCapture(step.model)
    step.run(capture)
    return capture.grads


class FakeClock:
    def __init__(self, times):
        self.times = iter(times)

    def __call__(self):
        return next(self.times)


# -------------------------------------------------------------------- gradient accumulation
@pytest.mark.parametrize("model,overrides", [("gpt-tiny", TINY), ("mlp", {"in_features": 32, "width": 64, "depth": 2})])
def test_accumulated_micro_batches_equal_one_big_batch(model, overrides):
    accumulated = make_step(batch=3, accum=4, model=model, overrides=overrides)
    single = make_step(batch=12, accum=1, model=model, overrides=overrides)
    # One batch of 4*3 samples made of exactly the four micro-batches.
    single.batches = [tuple(torch.cat(parts) for parts in zip(*accumulated.batches))]
    for a, b in zip(accumulated.model.parameters(), single.model.parameters()):
        assert torch.equal(a, b)  # same initial weights

    grads_accum = step_grads(accumulated)
    grads_single = step_grads(single)
    for ga, gs in zip(grads_accum, grads_single):
        torch.testing.assert_close(ga, gs, rtol=1e-5, atol=1e-7)


def test_step_leaves_no_gradients_and_returns_mean_loss():
    step = make_step(batch=2, accum=3)
    loss = step.run()
    assert all(p.grad is None for p in step.model.parameters())  # zero_grad(set_to_none=True)
    assert loss.shape == () and not loss.requires_grad
    assert 4.0 < loss.item() < 7.0  # about ln(256) = 5.5 for an untrained model


def test_batches_are_made_once_on_the_device():
    step = make_step(batch=5, accum=2)
    assert len(step.batches) == 2
    idx, targets = step.batches[0]
    assert idx.shape == (5, TINY["seq_len"]) and idx.device.type == "cpu"
    first = [t.data_ptr() for t in step.batches[0]]
    step.run()
    assert [t.data_ptr() for t in step.batches[0]] == first


# -------------------------------------------------------------------- precision
def test_bf16_gradients_close_to_fp32():
    fp32 = step_grads(make_step(batch=4, precision="fp32"))
    bf16 = step_grads(make_step(batch=4, precision="bf16"))
    for g32, g16 in zip(fp32, bf16):
        assert g16.dtype == torch.float32  # master weights and grads stay fp32
        rel = (g16 - g32).norm() / g32.norm().clamp_min(1e-12)
        assert rel < 0.1
    # and they are not simply identical: autocast really ran in bf16
    assert any(not torch.equal(a, b) for a, b in zip(fp32, bf16))


def test_fp16_uses_grad_scaler_and_unscales_before_step():
    step = make_step(batch=2, precision="fp16")
    assert step.scaler is not None and step.scaler.get_scale() == 65536.0
    grads = step_grads(step)  # after backward the grads are still scaled
    reference = step_grads(make_step(batch=2, precision="fp32"))
    ratio = (grads[0].norm() / reference[0].norm()).item()
    assert 0.5 * 65536 < ratio < 2 * 65536
    step.run()
    assert step.scaler.get_scale() == 65536.0  # finite grads: no backoff
    assert step.optimizer.state  # the optimizer really stepped


def test_optimizer_implementation_per_device():
    model = nn.Linear(4, 4)
    adamw = make_optimizer(model, "adamw", torch.device("cpu"))
    assert isinstance(adamw, torch.optim.AdamW) and adamw.defaults["foreach"] is True
    sgd = make_optimizer(model, "sgd", torch.device("cpu"))
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults["momentum"] == 0.9
    with pytest.raises(ValueError, match="adamw, sgd"):
        make_optimizer(model, "lion", torch.device("cpu"))


# -------------------------------------------------------------------- timers
def test_marks_follow_the_protocol():
    class Recorder(PhaseTimer):
        def __init__(self):
            self.marks = []

        def mark(self, phase):
            self.marks.append(phase)

    recorder = Recorder()
    make_step(batch=1, accum=3).run(recorder)
    assert recorder.marks == ["start"] + ["forward", "backward"] * 3 + ["optimizer"]


def test_perf_counter_timer_sums_phases_over_micro_batches():
    timer = PerfCounterTimer(clock=FakeClock([0.0, 0.010, 0.040, 0.055, 0.080, 0.083]))
    for phase in ("start", "forward", "backward", "forward", "backward", "optimizer"):
        timer.mark(phase)
    times = timer.collect()
    assert times["forward_ms"] == pytest.approx(10 + 15)
    assert times["backward_ms"] == pytest.approx(30 + 25)
    assert times["optimizer_ms"] == pytest.approx(3)
    assert times["step_ms"] == pytest.approx(83)
    assert timer.collect() == {}  # reset for the next step


def test_timer_choice_per_device():
    assert isinstance(make_timer("cpu"), PerfCounterTimer)
    assert NullTimer().collect() == {}


class _SleepInBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        time.sleep(0.05)
        return grad


class SleepyBackward(nn.Module):
    """Cheap forward, a backward that sleeps 50 ms."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 1)

    def forward(self, x, y):
        return F.mse_loss(_SleepInBackward.apply(self.fc(x)), y)


def build_sleepy():
    """User-model contract: (model, make_batch)."""

    def make_batch(batch_size, device):
        return torch.randn(batch_size, 8, device=device), torch.randn(batch_size, 1, device=device)

    return SleepyBackward(), make_batch


def test_sleeping_backward_is_attributed_to_backward():
    config = BenchConfig(model="tests.test_step:build_sleepy", batch=4, accum=2, device="cpu")
    model, make_batch = build_sleepy()
    step = TrainingStep(model, make_batch, config, "cpu")
    timer = PerfCounterTimer()
    step.run(timer)
    times = timer.collect()
    assert times["backward_ms"] >= 2 * 45  # two micro-batches, 50 ms each
    assert times["forward_ms"] < 20
    assert times["optimizer_ms"] < 20
    assert times["step_ms"] == pytest.approx(times["forward_ms"] + times["backward_ms"] + times["optimizer_ms"])
