"""``python -m engine selfcheck``: the tool checks its own measurements on this hardware.

A user's first command on a new machine. Each check runs real steps in the engine's worker
(the device queue included) and compares what the tool measures with something known:

* timing attribution: a model whose backward takes a known time (a calibrated
  ``torch.cuda._sleep`` kernel on a GPU, a sleep on the CPU) must have it in backward;
* the timing illusion (GPU): naive wall-clock timing must move GPU time out of forward;
* peak memory: on a GPU the allocator peak equals a hand-written loop's within 1 MiB; on
  the CPU the breakdown's activations equal an independent saved-tensor count;
* a memory cap below the run's peak gives ``oom``;
* no host synchronisation inside a timed step (``torch.cuda.set_sync_debug_mode("error")``
  on a GPU, tensors that raise when read on the CPU);
* a warm worker's second config has the same peak as a fresh worker's;
* accumulation and checkpointing give the same gradients;
* the device has a cited peak-FLOPs row (MFU), or why not.

Checks that need a GPU are ``skip`` with the reason on the CPU. ``run_selfcheck`` returns
the checks; the CLI prints them as a table (exit 1 if any failed), the Device page shows them.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, dataclass
from typing import Callable

from . import devices, flops, pitfall
from .config import GIB, BenchConfig
from .progress import Progress, ProgressFn
from .worker import Worker, call, run

MIB = 1024**2
SLEEP_MS = 50.0
CPU_DIMS = {"n_layers": 2, "seq_len": 32, "d_model": 64, "n_heads": 2, "vocab": 256}
GPU_DIMS = {"n_layers": 2, "seq_len": 128, "d_model": 128, "n_heads": 4, "vocab": 1024}


@dataclass(frozen=True)
class Check:
    """One check: what was expected, what was measured, and pass/fail/skip with the reason."""

    name: str
    status: str
    expected: str
    measured: str
    reason: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


# ------------------------------------------------------------------------- models with known times
def _sleep_on(tensor, ms: float) -> None:
    """Keep ``tensor``'s device busy for ``ms``: a calibrated GPU kernel (the host returns at
    once, as with real GPU work), or a sleep on the CPU."""
    import torch

    if tensor.is_cuda:
        torch.cuda._sleep(int(_cycles_per_ms() * ms))
    else:
        time.sleep(ms / 1000.0)


_calibration: dict[str, float] = {}


def _cycles_per_ms() -> float:
    """``torch.cuda._sleep`` cycles per millisecond on this GPU, measured with CUDA events."""
    import torch

    if "cycles" not in _calibration:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        torch.cuda._sleep(10_000_000)
        end.record()
        end.synchronize()
        _calibration["cycles"] = 10_000_000 / start.elapsed_time(end)
    return _calibration["cycles"]


def _timed_model(where: str):
    """``(model, make_batch)`` whose forward or backward (``where``) takes SLEEP_MS on its device."""
    import torch

    class Sleep(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            if where == "forward":
                _sleep_on(x, SLEEP_MS)
            return x.clone()

        @staticmethod
        def backward(ctx, grad):
            if where == "backward":
                _sleep_on(grad, SLEEP_MS)
            return grad

    class Timed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(8, 1)

        def forward(self, x):
            return Sleep.apply(self.fc(x)).sum()

    return Timed(), lambda batch_size, device: (torch.randn(batch_size, 8, device=device),)


def sleepy_backward():
    """A model whose backward takes SLEEP_MS on its device (the attribution check's)."""
    return _timed_model("backward")


def busy_forward():
    """A model whose forward takes SLEEP_MS on its device (the illusion check's)."""
    return _timed_model("forward")


# ------------------------------------------------------------------------- work done in the worker
def hand_loop_peak(config: BenchConfig, channel=None) -> int:
    """Peak allocated bytes of the plainest correct loop for ``config`` (fp32, no
    checkpointing, fused AdamW, as the engine builds them), after the same warm-up."""
    import torch

    from . import models

    device = torch.device(devices.resolve_device(config.device))
    torch.manual_seed(config.seed)
    with device:
        model, make_batch = models.build(config.model, config.overrides)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1, fused=True)
    batch = make_batch(config.batch, device)

    def one_step():
        model(*batch).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(config.warmup):
        one_step()
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    for _ in range(config.steps):
        one_step()
    torch.cuda.synchronize(device)
    return int(torch.cuda.max_memory_allocated(device))


def _activations_two_ways(config: BenchConfig, channel=None) -> tuple[int, int]:
    """(the breakdown's activations, bytes of the storages autograd saves in one forward)."""
    import torch

    from . import memory
    from .step import build_step

    step = build_step(config)
    step.run()
    activations = memory.memory_breakdown(step).activations
    skip = {t.untyped_storage().data_ptr() for t in step.model.parameters()}
    skip |= {t.untyped_storage().data_ptr() for batch in step.batches for t in batch}
    saved: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in skip:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), step.autocast():
        step.model(*step.batches[0])
    return activations, sum(saved.values())


@contextlib.contextmanager
def host_reads_raise():
    """Every way a tensor's value reaches the host raises (the CPU's stand-in for CUDA's
    sync debug mode): a timed step must never wait for the device."""
    import torch

    names = ("item", "__bool__", "tolist", "cpu", "__int__", "__float__", "numpy", "__index__")
    saved = {name: getattr(torch.Tensor, name) for name in names}

    def raiser(name):
        def raise_(self, *args, **kwargs):
            raise RuntimeError(f"host synchronisation: Tensor.{name}")
        return raise_

    for name in names:
        setattr(torch.Tensor, name, raiser(name))
    try:
        yield
    finally:
        for name, method in saved.items():
            setattr(torch.Tensor, name, method)


def _synchronising_steps(config: BenchConfig, channel=None) -> list[str]:
    """The precision/checkpointing combinations whose timed step synchronises with the host."""
    import torch

    from .step import build_step, make_optimizer

    failures = []
    for precision in ("fp32", "fp16", "bf16"):
        for ckpt in ("none", "full", "selective"):
            step = build_step(config.replace(precision=precision, ckpt=ckpt, warmup=max(config.warmup, 2)))
            if step.device.type == "cpu":
                # The optimizer a GPU run gets: fused kernels exist on the CPU too.
                step.optimizer = make_optimizer(step.model, config.optimizer, torch.device("cuda"))
            step.run()
            guard = torch.cuda.set_sync_debug_mode if step.device.type == "cuda" else None
            try:
                if guard is not None:
                    guard("error")
                    step.run()
                else:
                    with host_reads_raise():
                        step.run()
            except RuntimeError as exc:
                failures.append(f"{precision}/{ckpt}: {str(exc).splitlines()[0][:120]}")
            finally:
                if guard is not None:
                    guard("default")
    return failures


def _gradient_differences(config: BenchConfig, channel=None) -> dict[str, float]:
    """‖g − g_ref‖/‖g_ref‖ of accumulation (2 × half batches) and full checkpointing against
    one step of the whole batch, on the same weights and data (fp32)."""
    import torch

    from .numerics import rel_diff
    from .step import build_step

    def grads(step) -> list:
        step.model.zero_grad(set_to_none=True)
        accum = len(step.batches)
        for batch in step.batches:
            (step.model(*batch) / accum).backward()
        return [p.grad.detach().double().cpu() for p in step.model.parameters()]

    base = config.replace(precision="fp32", ckpt="none", accum=1, batch=4)
    reference_step = build_step(base)
    reference = grads(reference_step)
    whole = reference_step.batches[0]
    accumulated = build_step(base.replace(batch=2, accum=2))
    accumulated.batches = [tuple(t[:2] for t in whole), tuple(t[2:] for t in whole)]
    checkpointed = build_step(base.replace(ckpt="full"))
    checkpointed.batches = [whole]
    return {"accumulation": rel_diff(grads(accumulated), reference),
            "checkpointing": rel_diff(grads(checkpointed), reference)}


def _device_name(config: BenchConfig, channel=None) -> str:
    return devices.env_info(devices.resolve_device(config.device))["device_name"] or ""


# ------------------------------------------------------------------------- the checks
def _benchmark(config: BenchConfig):
    result = run(config)
    if not result.ok:
        raise _Failed(f"the benchmark failed: {result.status}: {result.error}")
    return result


class _Failed(Exception):
    """A check could not measure (its run failed): it fails with this reason."""


def _outcome_value(outcome):
    if not outcome.ok:
        raise _Failed(f"{outcome.status}: {outcome.error}")
    return outcome.value


def _attribution(base: BenchConfig, gpu: bool) -> Check:
    m = _benchmark(base.replace(model="engine.selfcheck:sleepy_backward", overrides={}, batch=4)).metrics
    forward, backward = m.forward_ms.median, m.backward_ms.median
    ok = 0.9 * SLEEP_MS <= backward <= 1.6 * SLEEP_MS and forward < 0.3 * SLEEP_MS
    return Check("timing attribution", "pass" if ok else "fail",
                 f"backward {0.9 * SLEEP_MS:.0f}–{1.6 * SLEEP_MS:.0f} ms, forward < {0.3 * SLEEP_MS:.0f} ms "
                 f"({SLEEP_MS:.0f} ms of {'GPU' if gpu else 'CPU'} work in backward)",
                 f"backward {backward:.1f} ms, forward {forward:.1f} ms")


def _illusion(base: BenchConfig, gpu: bool) -> Check:
    expected = f"naive forward < {0.3 * SLEEP_MS:.0f} ms where events measure ≈ {SLEEP_MS:.0f} ms"
    if not gpu:
        return Check("timing illusion", "skip", expected, "-", "needs a GPU: a CPU has no asynchrony to hide")
    config = base.replace(model="engine.selfcheck:busy_forward", overrides={}, batch=4)
    report = _outcome_value(call(pitfall.measure_pitfall, config, device=config.device, timeout_s=config.timeout_s))
    naive, correct = report["naive"]["forward_ms"]["median"], report["correct"]["forward_ms"]["median"]
    ok = naive < 0.3 * SLEEP_MS and 0.8 * SLEEP_MS <= correct <= 1.5 * SLEEP_MS
    return Check("timing illusion", "pass" if ok else "fail", expected,
                 f"naive forward {naive:.1f} ms, events {correct:.1f} ms")


def _peak(base: BenchConfig, gpu: bool) -> Check:
    if gpu:
        config = base.replace(batch=8)
        engine_peak = _benchmark(config).metrics.peak_allocated_bytes
        reference = _outcome_value(call(hand_loop_peak, config, device=config.device, timeout_s=config.timeout_s))
        ok = abs(engine_peak - reference) <= MIB
        return Check("peak memory vs a hand-written loop", "pass" if ok else "fail", "equal within 1 MiB",
                     f"engine {engine_peak / MIB:.2f} MiB, hand loop {reference / MIB:.2f} MiB")
    activations, saved = _outcome_value(call(_activations_two_ways, base, device=base.device, timeout_s=base.timeout_s))
    ok = abs(activations - saved) <= max(1024, 0.001 * saved)
    return Check("memory breakdown vs a saved-tensor count", "pass" if ok else "fail",
                 "activations equal the storages autograd saves (within 0.1 %)",
                 f"breakdown {activations / MIB:.3f} MiB, saved tensors {saved / MIB:.3f} MiB")


def _cap(base: BenchConfig, gpu: bool) -> Check:
    m = _benchmark(base).metrics
    peak = m.peak_allocated_bytes
    # Half of the run's own memory: on a GPU the cap also covers the CUDA context.
    context = (m.nvml_used_bytes - m.peak_reserved_bytes) if gpu and m.nvml_used_bytes and m.peak_reserved_bytes else 0
    cap_gib = (context + 0.5 * peak) / GIB
    capped = run(base.replace(memory_cap_gib=cap_gib))
    return Check("a memory cap below the peak", "pass" if capped.status == "oom" else "fail",
                 f"status oom under a {cap_gib * 1024:.1f} MiB cap (peak {peak / MIB:.1f} MiB)",
                 f"status {capped.status}" + (f": {capped.error[:80]}" if capped.error else ""))


def _no_sync(base: BenchConfig, gpu: bool) -> Check:
    failures = _outcome_value(call(_synchronising_steps, base, device=base.device, timeout_s=base.timeout_s))
    how = "torch.cuda.set_sync_debug_mode('error')" if gpu else "tensors that raise when read on the host"
    return Check("no host synchronisation in a timed step", "fail" if failures else "pass",
                 f"none for fp32/fp16/bf16 × none/full/selective ({how})", "; ".join(failures) or "none")


def _warm_vs_fresh(base: BenchConfig, gpu: bool) -> Check:
    first, second = base.replace(batch=8), base.replace(batch=2)
    _benchmark(first)
    warm = _benchmark(second).metrics.peak_allocated_bytes
    fresh_worker = Worker(devices.visible_devices_for(base.device))
    try:
        fresh = fresh_worker.run(second)
    finally:
        fresh_worker.close()
    if not fresh.ok:
        raise _Failed(f"the fresh worker's run failed: {fresh.status}: {fresh.error}")
    peak = fresh.metrics.peak_allocated_bytes
    return Check("warm worker vs a fresh one", "pass" if abs(warm - peak) <= MIB else "fail",
                 "the same peak within 1 MiB", f"warm {warm / MIB:.2f} MiB, fresh {peak / MIB:.2f} MiB")


def _gradients(base: BenchConfig, gpu: bool) -> Check:
    diffs = _outcome_value(call(_gradient_differences, base, device=base.device, timeout_s=base.timeout_s))
    limit = 1e-5
    ok = all(value <= limit for value in diffs.values())
    return Check("accumulation and checkpointing keep the gradients", "pass" if ok else "fail",
                 f"‖g − g_ref‖/‖g_ref‖ ≤ {limit:g} (fp32, same weights and data)",
                 ", ".join(f"{name} {value:.1e}" for name, value in diffs.items()))


def _peak_row(base: BenchConfig, gpu: bool) -> Check:
    expected = "a peak-FLOPs row with a cited source, for MFU"
    if not gpu:
        return Check("peak FLOPs for MFU", "skip", expected, "-", "MFU is reported for GPUs only")
    name = _outcome_value(call(_device_name, base, device=base.device, timeout_s=base.timeout_s))
    row = flops.peak_row(name)
    if row is None:
        return Check("peak FLOPs for MFU", "skip", expected, name,
                     "no cited datasheet figure for this device (or a MIG slice): MFU will be null")
    return Check("peak FLOPs for MFU", "pass", expected, f"{row.device}: {row.source}")


CHECKS: tuple[Callable[[BenchConfig, bool], Check], ...] = (
    _attribution, _illusion, _peak, _cap, _no_sync, _warm_vs_fresh, _gradients, _peak_row)
_NAMES = ("timing attribution", "timing illusion", "peak memory", "a memory cap below the peak",
          "no host synchronisation in a timed step", "warm worker vs a fresh one",
          "accumulation and checkpointing keep the gradients", "peak FLOPs for MFU")


def run_selfcheck(device: str = "auto", progress: ProgressFn | None = None, cancel=None) -> list[Check]:
    """Every check on ``device``, in order; a check whose measurement failed is ``fail`` with
    the reason (the others still run). ``cancel`` (a threading.Event) stops before the next
    check; the checks not run are left out."""
    resolved = devices.resolve_device(device)
    gpu = resolved.startswith("cuda")
    base = BenchConfig(model="gpt-tiny", overrides=GPU_DIMS if gpu else CPU_DIMS, batch=4, warmup=2, steps=5,
                       device=device, timeout_s=300.0)
    checks = []
    for i, (check, name) in enumerate(zip(CHECKS, _NAMES), start=1):
        if cancel is not None and cancel.is_set():
            break
        if progress is not None:
            progress(Progress(f"check {i} of {len(CHECKS)}: {name}"))
        try:
            checks.append(check(base, gpu))
        except _Failed as exc:
            checks.append(Check(name, "fail", "-", "-", str(exc)))
    return checks
