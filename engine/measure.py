"""Run one benchmark configuration in this process and return its v1 result.

The order of a run is the method:

1. build the model on the device, apply checkpointing, make the batches on the device;
2. warm-up steps (never measured: kernel selection, allocator growth, optimizer state);
3. the timed steps inside ``DeviceCounters`` (peak statistics reset first), each timed
   phase by phase with the device's timer (CUDA events + one synchronisation per step,
   ``perf_counter`` on CPU);
4. one separate instrumented step for the memory breakdown (``memory.py``);
5. one separate step under the FLOP counter (``flops.py``);
6. the gradients' distance from the fp32/no-checkpointing baseline (``numerics.py``, two
   first steps on fresh models).

Steps 4 to 6 come after the timing, so their instrumentation never slows a timed step.
``run_benchmark`` raises on failure; the worker turns exceptions into oom/error results.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch

from . import flops, memory, models, numerics, nvml
from .config import GIB, BenchConfig
from .devices import env_info, resolve_device
from .progress import Progress, ProgressFn
from .results import PHASES, Metrics, Result
from .stats import NOISE_THRESHOLD, Summary
from .step import TrainingStep, build_step, make_timer


class DeviceCounters:
    """What the device itself counts over the timed steps, read once they are over.

    CUDA: the caching allocator's peak allocated and reserved bytes (peaks reset on entry),
    its cache-flush-and-retry count, NVML's used memory (which also counts the CUDA context
    the allocator never sees) and NVML's energy counter (whole GPU). Elsewhere every
    reading stays None: a CPU run's peak comes from the instrumented step instead.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.peak_allocated_bytes: int | None = None
        self.peak_reserved_bytes: int | None = None
        self.allocator_retries: int | None = None
        self.nvml_used_bytes: int | None = None
        self.energy_j: float | None = None
        self._gpu: nvml.GpuCounters | None = None

    def __enter__(self) -> "DeviceCounters":
        if self.device.type != "cuda":
            return self
        uuid = str(torch.cuda.get_device_properties(self.device).uuid)
        # torch's own CUDA -> NVML index mapping honours CUDA_VISIBLE_DEVICES.
        self._gpu = nvml.GpuCounters(uuid, fallback_index=torch.cuda._get_nvml_device_index(self.device))
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        self._retries_before = torch.cuda.memory_stats(self.device).get("num_alloc_retries", 0)
        self._energy_before = self._gpu.energy_mj()
        return self

    def __exit__(self, *exc) -> None:
        if self._gpu is None:
            return
        try:
            if exc[0] is None:
                self._read()
        finally:
            self._gpu.close()

    def _read(self) -> None:
        torch.cuda.synchronize(self.device)
        stats = torch.cuda.memory_stats(self.device)
        self.peak_allocated_bytes = int(stats["allocated_bytes.all.peak"])
        self.peak_reserved_bytes = int(stats["reserved_bytes.all.peak"])
        self.allocator_retries = int(stats.get("num_alloc_retries", 0) - self._retries_before)
        # Sampled while the timed steps' memory is still cached.
        self.nvml_used_bytes = self._gpu.used_bytes()
        energy_after = self._gpu.energy_mj()
        if self._energy_before is not None and energy_after is not None and energy_after > self._energy_before:
            self.energy_j = (energy_after - self._energy_before) / 1000.0


@contextlib.contextmanager
def _on_device(device: torch.device, config: BenchConfig) -> Iterator[None]:
    """Make ``device`` current (CUDA events record on the current device's stream) and
    apply the CUDA memory cap; undo both and return cached memory afterwards, because the
    worker process is reused for the next config."""
    if device.type != "cuda":
        yield
        return
    with torch.cuda.device(device):
        # Memory cached by a previous config would count against this run's cap.
        torch.cuda.empty_cache()
        if config.memory_cap_gib is not None:
            total = torch.cuda.get_device_properties(device).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, config.memory_cap_gib * GIB / total), device)
        try:
            yield
        finally:
            if config.memory_cap_gib is not None:
                torch.cuda.set_per_process_memory_fraction(1.0, device)
            torch.cuda.empty_cache()


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def _phase(emit: ProgressFn, name: str, func: Callable, *args):
    """Run one untimed phase between its start and end progress events."""
    emit(Progress(name, 0, 1))
    value = func(*args)
    emit(Progress(name, 1, 1))
    return value


def _warm_up(step: TrainingStep, config: BenchConfig, emit: ProgressFn) -> None:
    for i in range(config.warmup):
        step.run()
        emit(Progress("warmup", i + 1, config.warmup))
    _synchronize(step.device)


def _time_steps(step: TrainingStep, config: BenchConfig, emit: ProgressFn) -> tuple[dict[str, list[float]], list[float] | None]:
    """Per-phase milliseconds of ``config.steps`` timed steps, and GradScaler's scale before
    and after each (fp16), read between steps after the timer's synchronisation."""
    timer = make_timer(step.device)
    samples: dict[str, list[float]] = {key: [] for key in PHASES}
    scales = [step.scaler.get_scale()] if step.scaler is not None else None
    for i in range(config.steps):
        step.run(timer)
        times = timer.collect()
        for key in PHASES:
            samples[key].append(times[key])
        if scales is not None:
            scales.append(step.scaler.get_scale())
        emit(Progress("measure", i + 1, config.steps))
    _synchronize(step.device)
    return samples, scales


def _skipped_steps(scales: list[float]) -> int:
    """Steps GradScaler skipped (inf/NaN gradients), from the loss scale read after each
    step: a skipped step always multiplies the scale by the backoff factor (< 1), a normal
    step never lowers it."""
    return sum(1 for before, after in zip(scales, scales[1:]) if after < before)


def _warnings(summaries: dict[str, Summary], steps: int, skipped: int | None, retries: int | None) -> list[str]:
    notes = []
    for key, summary in summaries.items():
        if summary.noisy:
            notes.append(
                f"{key} is noisy: IQR/median {summary.iqr_rel:.0%} > {NOISE_THRESHOLD:.0%} over {steps} steps "
                "(more steps or a quieter machine give steadier figures)"
            )
    if skipped:
        notes.append(f"{skipped} of {steps} timed steps were skipped by GradScaler (inf/NaN gradients)")
    if retries:
        notes.append(
            f"the CUDA caching allocator freed its cache and retried {retries} time(s) during the timed steps: "
            "they include memory-pressure stalls"
        )
    return notes


def run_benchmark(config: BenchConfig, progress: ProgressFn | None = None) -> Result:
    """Benchmark ``config`` in this process; return a complete ``ok`` Result.

    ``progress`` receives a ``Progress`` event per phase and step. Raises on failure (OOM
    included; an OOM of the numerics baseline only is a warning with ``grad_rel_diff`` None).
    """
    emit = progress or (lambda event: None)
    device = torch.device(resolve_device(config.device))
    env = env_info(str(device))
    with _on_device(device, config):
        step = _phase(emit, "build", build_step, config)
        _warm_up(step, config, emit)
        with DeviceCounters(device) as counters:
            samples, scales = _time_steps(step, config, emit)
        breakdown = _phase(emit, "breakdown", memory.memory_breakdown, step)
        model_flops, hw_flops = _phase(emit, "flops", flops.count_flops, step)
        tokens = models.tokens_per_sample(step.model)
        tf32 = flops.fp32_uses_tf32(step.model) if config.precision == "fp32" else False
        # The numerical cost runs two more first steps on fresh models: after everything
        # measured, with this run's model freed so they can use its memory, and still on
        # this device under this run's memory cap.
        del step
        grad_rel_diff, numerics_warning = _phase(emit, "numerics", numerics.grad_rel_diff, config)

    summaries = {key: Summary.from_samples(values) for key, values in samples.items()}
    step_s = summaries["step_ms"].median / 1000.0
    samples_per_s = config.effective_batch / step_s if step_s > 0 else None
    skipped = _skipped_steps(scales) if scales is not None else None
    metrics = Metrics(
        effective_batch=config.effective_batch,
        **summaries,
        samples_per_s=samples_per_s,
        tokens_per_s=samples_per_s * tokens if tokens and samples_per_s else None,
        # Without a caching allocator to ask (CPU, MPS) the peak is the instrumented step's.
        peak_allocated_bytes=counters.peak_allocated_bytes if counters.peak_allocated_bytes is not None else breakdown.total,
        peak_reserved_bytes=counters.peak_reserved_bytes,
        nvml_used_bytes=counters.nvml_used_bytes,
        memory_breakdown_bytes=breakdown,
        flops_per_step=model_flops,
        hw_flops_per_step=hw_flops,
        mfu=flops.mfu(model_flops, step_s, env["device_name"], config.precision, tf32) if device.type == "cuda" else None,
        loss_scale=scales[-1] if scales is not None else None,
        skipped_steps=skipped,
        # Whole-GPU energy (other processes on the GPU included) over the timed steps.
        energy_j_per_sample=counters.energy_j / (config.steps * config.effective_batch) if counters.energy_j else None,
        grad_rel_diff=grad_rel_diff,
        allocator_retries=counters.allocator_retries,
    )
    warnings = _warnings(summaries, config.steps, skipped, counters.allocator_retries)
    warnings += [numerics_warning] if numerics_warning else []
    return Result.new(config, "ok", env, metrics=metrics, samples=samples, warnings=warnings)
