"""The timing pitfall, for talks: the same step timed naively and correctly, side by side.

Naive: host wall-clock (``time.perf_counter``) at each phase boundary with no
synchronisation, and one at the end of the step, as a training loop that logs
``loss.item()`` once per step does. On a GPU the host only *launches* kernels, so forward
and backward look nearly free and the GPU time lands in whichever phase synchronises: here
the optimizer phase. (When the launch queue fills up, the host blocks mid-backward instead,
and the time lands there: the familiar "forward takes milliseconds, backward takes seconds".)

Correct: the engine's timer for the device (``step.make_timer``): CUDA events recorded on
the stream between phases, read after one synchronisation per step. On a CPU there is no
asynchrony: both are ``perf_counter`` and agree within noise, which the result says.

Steps alternate between the two timers, so drift (clocks, thermals) hits both alike.
"""
from __future__ import annotations

from .config import BenchConfig
from .stats import Summary
from .step import PerfCounterTimer, build_step, make_timer, on_device
from .worker import Outcome, call

PHASE_KEYS = ("forward_ms", "backward_ms", "optimizer_ms", "step_ms")


class NaiveTimer(PerfCounterTimer):
    """perf_counter at every mark, and a device synchronisation just before the last one
    (the end of the step), like a loop that reads the loss once per step."""

    def __init__(self, synchronize):
        super().__init__()
        self._synchronize = synchronize

    def mark(self, phase: str) -> None:
        if phase == "optimizer":
            self._synchronize()
        super().mark(phase)


def _synchronizer(device):
    import torch

    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    if device.type == "mps":
        return torch.mps.synchronize
    return lambda: None


def measure_pitfall(config: BenchConfig, channel=None) -> dict:
    """Time ``config.steps`` steps with each method (after ``config.warmup`` warm-up steps)
    in this process. Returns device_type, asynchronous, correct_method, naive and correct
    (per-phase Summary dicts) and a one-sentence message."""
    step = build_step(config)
    with on_device(step.device):  # the events and the step's kernels go to the target GPU
        return _measure(step, config)


def _measure(step, config: BenchConfig) -> dict:
    sync = _synchronizer(step.device)
    for _ in range(config.warmup):
        step.run()
    sync()
    naive, correct = NaiveTimer(sync), make_timer(step.device)
    samples = {"naive": {k: [] for k in PHASE_KEYS}, "correct": {k: [] for k in PHASE_KEYS}}
    for _ in range(config.steps):
        for name, timer in (("naive", naive), ("correct", correct)):
            step.run(timer)
            times = timer.collect()
            sync()  # the next step starts on an idle device whichever timer ran
            for key in PHASE_KEYS:
                samples[name][key].append(times[key])
    summaries = {name: {k: Summary.from_samples(v).to_dict() for k, v in per.items()} for name, per in samples.items()}
    asynchronous = step.device.type != "cpu"
    return {
        "config": config.to_dict(),
        "device_type": step.device.type,
        "asynchronous": asynchronous,
        "correct_method": "CUDA events, one synchronisation per step" if asynchronous else "time.perf_counter",
        "naive": summaries["naive"],
        "correct": summaries["correct"],
        "message": _message(summaries, asynchronous),
    }


def _message(summaries: dict, asynchronous: bool) -> str:
    naive, correct = summaries["naive"], summaries["correct"]
    if not asynchronous:
        return (
            "On a CPU there is no asynchrony: every operator has finished when it returns, so the "
            "naive wall clock and the correct timer measure the same thing and agree within noise."
        )
    biggest = max(("forward_ms", "backward_ms", "optimizer_ms"), key=lambda k: naive[k]["median"] - correct[k]["median"])
    return (
        f"The naive wall clock puts {naive[biggest]['median']:.1f} ms in {biggest[:-3]} where device events measure "
        f"{correct[biggest]['median']:.1f} ms: GPU work launched earlier is waited for in the phase that synchronises."
    )


def pitfall(config: BenchConfig, progress=None, cancel=None) -> Outcome:
    """``measure_pitfall`` in the device's worker process, after waiting for the device. The
    Outcome's value is the comparison; a failure is its status (oom, error, timeout,
    cancelled)."""
    return call(measure_pitfall, config, device=config.device, timeout_s=config.timeout_s, progress=progress,
                cancel=cancel, alloc_conf=config.alloc_conf)
