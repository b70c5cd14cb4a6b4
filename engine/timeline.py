"""Memory over one optimizer step, with the phase it is in.

One step of the config (after warm-up, so optimizer state exists and the step is the steady
state) is recorded by the same ``TrainingStep.run(timer)`` that is benchmarked: the timer's
``mark(phase)`` calls give the phase bands (forward and backward per micro-batch, then the
optimizer), and memory comes from

* CUDA: the caching allocator's own history (``torch.cuda.memory._record_memory_history``
  and ``_snapshot``): every block allocated and freed, with its time. Summed from the
  allocated bytes before the step, this is ``torch.cuda.memory_allocated`` over time.
* CPU (no allocator to ask): a ``TorchDispatchMode`` that sees every operator's outputs and
  counts each new tensor storage until it is garbage collected (a weak-reference callback),
  on top of the storages that exist before the step (weights, optimizer state, batches).
  It is sampled after every operator and at every phase mark.

Both give (time in ms since the step started, bytes allocated) samples; memory that is not
a tensor (cuBLAS workspaces, the CUDA context) is not in either, as in ``peak_allocated_bytes``.

On CUDA the time axis is the *host's*: the allocator records each allocation when the host
issues it, long before the GPU runs the kernel (the timing illusion the pitfall page shows).
So the samples are in allocation order on a host clock, the bands' edges are host marks on
the same clock, and each band also carries ``gpu_ms``: how long the phase took on the GPU,
from CUDA events recorded at the same marks. On the CPU both are the same clock.
"""
from __future__ import annotations

import time
import weakref

from .config import BenchConfig
from .step import EventTimer, PhaseTimer, build_step, on_device
from .worker import Outcome, call

HOST_AXIS = "host time when each allocation was issued (ms since the step started); GPU time per phase is gpu_ms"
WALL_AXIS = "ms since the step started"


class _MarkRecorder(PhaseTimer):
    """Keeps (phase, time ms) per mark, with an optional callback per mark (to sample) and an
    optional device timer marked at the same boundaries."""

    def __init__(self, clock_ms, on_mark=None, device_timer: EventTimer | None = None):
        self.marks: list[tuple[str, float]] = []
        self._clock_ms = clock_ms
        self._on_mark = on_mark
        self.device_timer = device_timer

    def mark(self, phase: str) -> None:
        if self._on_mark is not None:
            self._on_mark()
        self.marks.append((phase, self._clock_ms()))
        if self.device_timer is not None:
            self.device_timer.mark(phase)


def _phase_bands(marks: list[tuple[str, float]], accum: int, gpu_ms: list[float] | None = None) -> list[dict]:
    """Intervals between marks, each named after the mark that ends it; with accumulation
    forward/backward carry their micro-batch number ("forward 2"). ``gpu_ms``: each
    interval's duration on the device (CUDA), else the interval itself."""
    bands, seen = [], {}
    for i, ((_, start), (phase, end)) in enumerate(zip(marks, marks[1:])):
        seen[phase] = seen.get(phase, 0) + 1
        name = f"{phase} {seen[phase]}" if accum > 1 and phase != "optimizer" else phase
        bands.append({"phase": name, "start_ms": start, "end_ms": end,
                      "gpu_ms": gpu_ms[i] if gpu_ms is not None else end - start})
    return bands


# ------------------------------------------------------------------------- CPU
def _storage_bytes(tensors) -> dict[int, int]:
    """Unique storages (by data pointer) of ``tensors`` and their sizes."""
    return {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}


def _existing_tensors(step):
    """Tensors alive before the step: parameters, buffers, optimizer state, batches."""
    import torch

    yield from step.model.parameters()
    yield from step.model.buffers()
    for state in step.optimizer.state.values():
        yield from (v for v in state.values() if isinstance(v, torch.Tensor))
    for batch in step.batches:
        yield from (t for t in batch if isinstance(t, torch.Tensor))


def _record_cpu(step) -> tuple[list[float], list[int], list[tuple[str, float]]]:
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    existing = _storage_bytes(t for t in _existing_tensors(step) if t.device.type == "cpu")
    live = {"bytes": sum(existing.values())}
    seen: set[int] = set(existing)  # storages counted (by data pointer) and not yet freed
    t0 = time.perf_counter()
    times: list[float] = []
    values: list[int] = []

    def now_ms() -> float:
        return (time.perf_counter() - t0) * 1000.0

    def sample() -> None:
        times.append(now_ms())
        values.append(live["bytes"])

    def freed(ptr: int, nbytes: int) -> None:
        seen.discard(ptr)
        live["bytes"] -= nbytes

    class LiveStorages(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in tree_leaves(out):
                if not isinstance(t, torch.Tensor) or t.device.type != "cpu":
                    continue
                st = t.untyped_storage()
                ptr = st.data_ptr()
                if ptr in seen or st.nbytes() == 0:
                    continue  # a view, an in-place result or an empty tensor: nothing new
                seen.add(ptr)
                live["bytes"] += st.nbytes()
                weakref.finalize(st, freed, ptr, st.nbytes())
            sample()
            return out

    recorder = _MarkRecorder(now_ms, on_mark=sample)
    with LiveStorages():
        step.run(recorder)
    return times, values, recorder.marks


# ------------------------------------------------------------------------- CUDA
def allocated_over_time(trace: list[dict], start_bytes: int, t0_ms: float) -> tuple[list[float], list[int]]:
    """(ms since ``t0_ms``, bytes allocated) after each allocation and completed free of one
    device's allocator trace (``torch.cuda.memory._snapshot()["device_traces"][i]``), starting
    from ``start_bytes``; other actions (segment maps, frees still pending on a stream) do
    not change what is allocated."""
    if trace and "time_us" not in trace[0]:
        raise RuntimeError("this torch's CUDA memory history has no timestamps (time_us); it needs torch >= 2.1")
    times, values, current = [0.0], [start_bytes], start_bytes
    for entry in trace:
        if entry["action"] == "alloc":
            current += entry["size"]
        elif entry["action"] == "free_completed":
            current -= entry["size"]
        else:
            continue
        times.append(entry["time_us"] / 1000.0 - t0_ms)
        values.append(current)
    return times, values


def _record_cuda(step) -> tuple[list[float], list[int], list[tuple[str, float]], list[float]]:
    import torch

    device = step.device
    index = device.index if device.index is not None else torch.cuda.current_device()
    torch.cuda.synchronize(device)
    start_bytes = torch.cuda.memory_allocated(device)
    # The allocator's trace times are host wall-clock microseconds (Unix epoch), so the
    # phase marks use the same clock; CUDA events at the same marks time the phases on the
    # GPU. No stack traces: they are the costly part.
    recorder = _MarkRecorder(lambda: time.time_ns() / 1e6, device_timer=EventTimer(device))
    torch.cuda.memory._record_memory_history(enabled="all", context=None, stacks="python", device=device)
    try:
        step.run(recorder)
        torch.cuda.synchronize(device)
        snapshot = torch.cuda.memory._snapshot(device)
    finally:
        torch.cuda.memory._record_memory_history(enabled=None, device=device)
    t0 = recorder.marks[0][1]
    times, values = allocated_over_time(snapshot["device_traces"][index], start_bytes, t0)
    marks = [(phase, t - t0) for phase, t in recorder.marks]
    return times, values, marks, recorder.device_timer.intervals()


# ------------------------------------------------------------------------- public
def record_timeline(config: BenchConfig) -> dict:
    """Memory over one optimizer step of ``config``, recorded in this process.

    Returns config, device_type, source, time_axis (what t_ms means), t_ms and bytes
    (samples), phases (bands with phase, start_ms, end_ms, gpu_ms), baseline_bytes (before
    the step), peak_bytes, peak_ms and peak_phase.
    """
    step = build_step(config)
    # One step at least: optimizer state is created lazily by the first step, and a
    # first step's memory is not the steady state the benchmark measures.
    for _ in range(max(1, config.warmup)):
        step.run()
    if step.device.type == "cuda":
        with on_device(step.device):
            times, values, marks, gpu_ms = _record_cuda(step)
        source = "CUDA caching-allocator history (torch.cuda.memory._record_memory_history)"
        axis = HOST_AXIS
    else:
        times, values, marks = _record_cpu(step)
        gpu_ms = None
        source = "CPU: live tensor storages, sampled after every operator (TorchDispatchMode)"
        axis = WALL_AXIS
    phases = _phase_bands(marks, config.accum, gpu_ms)
    peak_i = max(range(len(values)), key=values.__getitem__)
    peak_ms = times[peak_i]
    peak_phase = next((b["phase"] for b in phases if b["start_ms"] <= peak_ms <= b["end_ms"]), None)
    return {
        "config": config.to_dict(),
        "device_type": step.device.type,
        "source": source,
        "time_axis": axis,
        "t_ms": times,
        "bytes": values,
        "phases": phases,
        "baseline_bytes": values[0],
        "peak_bytes": values[peak_i],
        "peak_ms": peak_ms,
        "peak_phase": peak_phase,
    }


def record_timelines(configs: list[BenchConfig], channel=None) -> list[dict]:
    """``record_timeline`` of each config in turn (each step is freed before the next)."""
    return [record_timeline(config) for config in configs]


def timelines(configs: list[BenchConfig], progress=None, cancel=None) -> Outcome:
    """Timelines of one or more configs (e.g. checkpointing none vs full, to overlay) in a
    fresh worker process (an untouched allocator), after waiting for the device. The
    Outcome's value is the list of timelines; a failure is its status (oom, error, timeout,
    cancelled)."""
    devices = {config.device for config in configs}
    if len(devices) != 1:
        raise ValueError(f"timelines to overlay must use one device, got {sorted(devices)}")
    # One process, so one set of allocator settings (torch reads them once, when CUDA starts).
    settings = {config.alloc_conf for config in configs}
    if len(settings) != 1:
        raise ValueError(f"timelines to overlay must use one allocator setting, got {sorted(map(str, settings))}")
    return call(record_timelines, list(configs), device=configs[0].device,
                timeout_s=sum(config.timeout_s for config in configs), progress=progress, cancel=cancel, fresh=True,
                alloc_conf=configs[0].alloc_conf)


def phase_peaks(record: dict) -> list[dict]:
    """The highest and lowest allocated bytes within each phase band of a timeline, and how
    long the phase took on the device (``ms``: GPU time on CUDA, wall time on the CPU)."""
    rows = []
    for band in record["phases"]:
        inside = [v for t, v in zip(record["t_ms"], record["bytes"]) if band["start_ms"] <= t <= band["end_ms"]]
        if inside:
            rows.append({"phase": band["phase"], "max_bytes": max(inside), "min_bytes": min(inside),
                         "ms": band.get("gpu_ms", band["end_ms"] - band["start_ms"])})
    return rows
