"""Run one benchmark configuration in this process and return its v1 result.

The order of a run is the method:

1. build the model on the device, apply checkpointing, make the batches on the device;
2. warm-up steps (never measured: kernel selection, allocator growth, optimizer state,
   torch.compile's compilation, whose wall time is reported apart as ``compile_s``);
3. the timed steps between ``DeviceCounters.start`` and ``stop`` (peak statistics reset
   first), each timed phase by phase with the device's timer (CUDA events on the target
   device's stream + one synchronisation per step, ``perf_counter`` on CPU); then untimed
   steps until NVML's energy window is long enough (counters.py);
4. one separate instrumented step for the memory breakdown (``memory.py``), after, on the
   CPU under torch.compile, one more for the peak (the breakdown's step runs eager);
5. one separate step under the FLOP counter (``flops.py``);
6. the gradients' distance from the fp32/no-checkpointing/eager baseline (``numerics.py``,
   two first steps on fresh models).

Steps 4 to 6 come after the timing, so their instrumentation never slows a timed step.
``run_benchmark`` raises on failure; the worker turns exceptions into oom/error results.
"""
from __future__ import annotations

import contextlib
import time
from typing import Callable, Iterator

import torch

from . import counters, flops, memory, models, numerics
from .config import GIB, BenchConfig
from .devices import env_info, resolve_device
from .progress import Progress, ProgressFn
from .results import PHASES, Metrics, Result
from .stats import NOISE_THRESHOLD, TIMED_WORDS, Summary
from .step import TrainingStep, build_step, make_timer, on_device


@contextlib.contextmanager
def _on_device(device: torch.device, config: BenchConfig, notes: list[str]) -> Iterator[None]:
    """Make ``device`` current and apply the memory cap for the run (CUDA; nothing elsewhere)."""
    with on_device(device), counters.memory_cap(device, config.memory_cap_gib, notes):
        yield


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


def compiled_graphs() -> int:
    """Graphs dynamo has compiled in this process so far (its own counter; 0 before any)."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def _warm_up(step: TrainingStep, config: BenchConfig, emit: ProgressFn) -> list[float] | None:
    """Run the warm-up steps; under torch.compile return the wall seconds of each warm-up
    step in which dynamo compiled a graph (None for an eager run)."""
    compiled = config.compile != "none"
    compiling = []
    for i in range(config.warmup):
        before, started = compiled_graphs() if compiled else 0, time.perf_counter()
        step.run()
        if compiled:
            _synchronize(step.device)  # the step's own time, not the next one's
            if compiled_graphs() > before:
                compiling.append(time.perf_counter() - started)
        emit(Progress("warmup", i + 1, config.warmup))
    _synchronize(step.device)
    return compiling if compiled else None


def compile_seconds(compiling_steps_s: list[float], step_s: float) -> float:
    """Compile time of a run: what the warm-up steps that compiled took beyond a measured step.

    Wall time, not the figures dynamo and inductor keep (``torch._dynamo.utils.
    compile_times``): those are internal, change between releases and split the work into
    nested timers (tracing, AOT autograd, inductor's lowering, C++ builds, autotuning, and a
    backward compiled lazily at the first backward) that are easy to miss or count twice.
    The wall time of the compiling steps holds all of it, is what a user waits, and, less
    the median measured step (the step's own work), is what compilation added. Any other
    first-step cost an eager run also pays (optimizer state created, memory first touched)
    is in it too; next to compilation it is small.
    """
    return sum(max(0.0, seconds - step_s) for seconds in compiling_steps_s)


def compile_time(compiling: dict[str, list[float] | None], step_s: float) -> tuple[float | None, list[str]]:
    """A run's compile time and notes, from each of its processes' compiling warm-up steps
    (``_warm_up``), keyed by how a note names the process ("" for a run's one process,
    "rank 1's " for a data-parallel run's): the slowest process's (the run waits for the
    last), with a note for a process that compiled nothing. (None, []) for an eager run."""
    if any(steps is None for steps in compiling.values()):
        return None, []
    notes = [f"torch.compile compiled no graph during {whose}warm-up: its steps ran eager"
             for whose, steps in compiling.items() if steps == []]
    return max(compile_seconds(steps, step_s) for steps in compiling.values()), notes


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
                f"{summary.noise_words(TIMED_WORDS.get(key, key))} (over {steps} steps; more than "
                f"{NOISE_THRESHOLD:.0%} is noisy: more steps or a quieter machine give steadier figures)"
            )
    if skipped:
        notes.append(f"{skipped} of {steps} timed steps were skipped by GradScaler (inf/NaN gradients)")
    if retries:
        notes.append(
            f"the CUDA caching allocator freed its cache and retried {retries} time(s) during the timed steps: "
            "they include memory-pressure stalls"
        )
    return notes


def batch_norm_warning(layers: list[str], accum: int) -> str | None:
    """Why accumulation is not a bigger batch for a model with BatchNorm (None when it is)."""
    if not layers or accum <= 1:
        return None
    return (f"the model normalises with batch statistics ({len(layers)} BatchNorm layers, e.g. {layers[0]}): each of "
            f"the {accum} micro-batches is normalised on its own, so accumulation does not give the gradients of one "
            "batch of the effective size")


OFFLOAD_ON_HOST_WARNING = (
    "activation offloading saves no device memory on the {device}: the host memory it keeps the saved activations "
    "in is the device's own memory")
COMPILE_BREAKDOWN_WARNING = (
    "the memory breakdown comes from one uncompiled (eager) instrumented step: torch.compile does not run under "
    "the memory tracker, and compiled code may keep less (the peak is the compiled steps' own)")

# torch.optim.Adafactor calls .item() on every parameter's norm (and its step) each step.
ADAFACTOR_SYNC_WARNING = (
    "torch's Adafactor reads values back to the host for every parameter in each step (.item() on norms): on "
    "CUDA each is a synchronisation, so its optimizer time includes waiting for the GPU and the next step "
    "cannot be queued ahead")


def _model_warnings(step: TrainingStep, config: BenchConfig) -> list[str]:
    """What the model and the run's options make worth saying: checkpointing that misses most
    of the model, BatchNorm with accumulation, offloading where host memory is device memory,
    a compiled run's memory breakdown measured eager, and Adafactor's host synchronisations on CUDA."""
    notes = []
    if config.ckpt == "offload" and step.device.type != "cuda":
        notes.append(OFFLOAD_ON_HOST_WARNING.format(device=step.device.type.upper()))
    if config.compile != "none":
        notes.append(COMPILE_BREAKDOWN_WARNING)
    if config.optimizer == "adafactor" and step.device.type == "cuda":
        notes.append(ADAFACTOR_SYNC_WARNING)
    if step.checkpointed is not None and (warning := step.checkpointed.warning()):
        notes.append(warning)
    if warning := batch_norm_warning(models.batch_norm_layers(step.model), config.accum):
        notes.append(warning)
    return notes


def run_environment(config: BenchConfig, device: str) -> dict:
    """The environment a run of ``config`` on ``device`` records. Allocator settings the config
    chose (``alloc_conf``) are the config's, not the environment's: runs that differ only in
    them stay one environment, so decisions compare them; inherited ones stay recorded."""
    env = env_info(device)
    if config.alloc_conf is not None:
        env["alloc_conf"] = None
    return env


def run_benchmark(config: BenchConfig, progress: ProgressFn | None = None) -> Result:
    """Benchmark ``config`` in this process; return a complete ``ok`` Result.

    ``progress`` receives a ``Progress`` event per phase and step. Raises on failure (OOM
    included, and a CPU run whose tracked peak exceeds its memory cap; an OOM of the
    numerics baseline only is a warning with ``grad_rel_diff`` None).
    """
    started = time.perf_counter()
    emit = progress or (lambda event: None)
    device = torch.device(resolve_device(config.device))
    env = run_environment(config, str(device))
    notes: list[str] = []
    with _on_device(device, config, notes):
        step = _phase(emit, "build", build_step, config)
        compiling_steps_s = _warm_up(step, config, emit)
        device_counters = counters.DeviceCounters(device)
        try:
            graphs_before = compiled_graphs() if compiling_steps_s is not None else None
            device_counters.start()
            samples, scales = _time_steps(step, config, emit)
            device_counters.stop()
            if graphs_before is not None and compiled_graphs() > graphs_before:
                notes.append("torch.compile compiled again during the timed steps: their times include "
                             "compilation (more warm-up steps would keep it out)")
            # Untimed steps to complete the energy window, never past half of what is left
            # of the run's time limit (the breakdown, FLOPs and numerics still need time).
            left = config.timeout_s - (time.perf_counter() - started)
            device_counters.measure_energy(step.run, config.effective_batch, config.steps,
                                           deadline_s=time.perf_counter() + left / 2)
        finally:
            device_counters.close()
        # Without a caching allocator to ask (CPU, MPS) the peak is the instrumented step's,
        # and under torch.compile on the CPU one more step's, seen at the allocator. That
        # step comes first: after the breakdown's tracker the model no longer runs compiled.
        compiled_cpu_peak = None
        if device.type == "cpu" and config.compile != "none":
            compiled_cpu_peak = _phase(emit, "peak", memory.cpu_step_peak_bytes, step)
        breakdown = _phase(emit, "breakdown", memory.memory_breakdown, step)
        cpu_peak = compiled_cpu_peak if compiled_cpu_peak is not None else breakdown.total
        if device.type == "cpu":
            counters.check_cpu_cap(config.memory_cap_gib, cpu_peak)
        model_flops, hw_flops = _phase(emit, "flops", flops.count_flops, step)
        tokens = models.tokens_per_sample(step.model)
        tf32 = flops.fp32_uses_tf32(step.model) if config.precision == "fp32" else False
        checkpointed = step.checkpointed
        notes += _model_warnings(step, config)
        # The numerical cost runs two more first steps on fresh models: after everything
        # measured, with this run's model freed so they can use its memory, and still on
        # this device under this run's memory cap.
        del step
        grad_rel_diff, numerics_warning = _phase(emit, "numerics", numerics.grad_rel_diff, config)

    summaries = {key: Summary.from_samples(values) for key, values in samples.items()}
    step_s = summaries["step_ms"].median / 1000.0
    compile_s, compile_notes = compile_time({"": compiling_steps_s}, step_s)
    notes += compile_notes
    samples_per_s = config.effective_batch / step_s if step_s > 0 else None
    skipped = _skipped_steps(scales) if scales is not None else None
    c = device_counters
    metrics = Metrics(
        effective_batch=config.effective_batch,
        **summaries,
        samples_per_s=samples_per_s,
        tokens_per_s=samples_per_s * tokens if tokens and samples_per_s else None,
        peak_allocated_bytes=c.peak_allocated_bytes if c.peak_allocated_bytes is not None else cpu_peak,
        peak_reserved_bytes=c.peak_reserved_bytes,
        nvml_used_bytes=c.nvml_used_bytes,
        nvml_device_used_bytes=c.nvml_device_used_bytes,
        memory_breakdown_bytes=breakdown,
        flops_per_step=model_flops,
        hw_flops_per_step=hw_flops,
        mfu=flops.mfu(model_flops, step_s, env["device_name"], config.precision, tf32) if device.type == "cuda" else None,
        loss_scale=scales[-1] if scales is not None else None,
        skipped_steps=skipped,
        energy_j_per_sample=c.energy_j_per_sample,
        grad_rel_diff=grad_rel_diff,
        allocator_retries=c.allocator_retries,
        compile_s=compile_s,
    )
    warnings = _warnings(summaries, config.steps, skipped, c.allocator_retries) + notes + c.notes
    if config.memory_cap_gib is not None and c.nvml_used_bytes is not None and c.nvml_used_bytes > config.memory_cap_gib * GIB:
        warnings.append(f"this process used {c.nvml_used_bytes / GIB:.2f} GiB of the GPU in all, above the "
                        f"{config.memory_cap_gib:g} GiB cap: memory taken outside the caching allocator after the "
                        "cap was set (e.g. kernels loaded lazily) is not capped")
    warnings += [numerics_warning] if numerics_warning else []
    return Result.new(config, "ok", env, metrics=metrics, samples=samples, warnings=warnings, checkpointed=checkpointed)
