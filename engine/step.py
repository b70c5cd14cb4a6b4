"""The one training-step code path, and the timers that plug into it.

``TrainingStep.run(timer)`` performs one optimizer step (``accum`` micro-batches, then the
optimizer) and calls ``timer.mark(phase)`` at every phase boundary. Measurement, the
instrumented memory step, FLOP counting and the decision tools all call this same method
with different timers, so what is measured is exactly what is benchmarked.

Mark protocol, per step: ``mark("start")``, then after each micro-batch
``mark("forward")`` (model forward incl. loss) and ``mark("backward")`` (incl. any
checkpoint recompute), and finally ``mark("optimizer")`` (unscale, step, scaler update,
zero_grad), which ends the step. The interval that ends at a mark is attributed to that
mark's phase, so with accumulation forward and backward are summed over micro-batches.
"""
from __future__ import annotations

import contextlib
import time
from typing import Callable

import torch
import torch.nn as nn

from . import checkpointing, models
from .devices import resolve_device

PHASES = ("forward", "backward", "optimizer")
AUTOCAST_DTYPES = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}


# ------------------------------------------------------------------------------ timers
class PhaseTimer:
    """Timer interface: ``mark(phase)`` at boundaries, ``collect()`` after the step."""

    def mark(self, phase: str) -> None:
        """Record the boundary that ends ``phase`` ("start" begins the step)."""

    def collect(self) -> dict[str, float]:
        """Milliseconds per phase for the step just run (``forward_ms``, ``backward_ms``,
        ``optimizer_ms``, ``step_ms``) and reset for the next step; ``{}`` if nothing timed."""
        return {}


class NullTimer(PhaseTimer):
    """Times nothing (warm-up, instrumented steps)."""


class _StampTimer(PhaseTimer):
    """Keeps ``(phase, stamp)`` pairs; subclasses say what a stamp is and how to diff two."""

    def __init__(self) -> None:
        self._marks: list[tuple[str, object]] = []

    def _stamp(self):
        raise NotImplementedError

    def _elapsed_ms(self, start, end) -> float:
        raise NotImplementedError

    def _wait(self, last) -> None:
        """Block until ``last`` stamp is complete (no-op for host clocks)."""

    def mark(self, phase: str) -> None:
        self._marks.append((phase, self._stamp()))

    def _take(self) -> list[tuple[str, object]]:
        """The step's marks (reset for the next step), once the last one is complete."""
        marks, self._marks = self._marks, []
        if len(marks) >= 2:
            self._wait(marks[-1][1])
        return marks

    def collect(self) -> dict[str, float]:
        marks = self._take()
        if len(marks) < 2:
            return {}
        times = {f"{phase}_ms": 0.0 for phase in PHASES}
        for (_, start), (phase, end) in zip(marks, marks[1:]):
            times[f"{phase}_ms"] += self._elapsed_ms(start, end)
        times["step_ms"] = self._elapsed_ms(marks[0][1], marks[-1][1])
        return times

    def intervals(self) -> list[float]:
        """Milliseconds of each interval between consecutive marks of the step just run (the
        memory timeline's phase bands), and reset for the next step."""
        marks = self._take()
        return [self._elapsed_ms(start, end) for (_, start), (_, end) in zip(marks, marks[1:])]


class PerfCounterTimer(_StampTimer):
    """Host wall-clock timer (``time.perf_counter`` by default; ``clock`` is injectable).

    Correct for CPU work. On a GPU it measures when the host *launched* the work, which is
    the naive method: GPU time lands in whichever phase happens to synchronise.
    """

    def __init__(self, clock: Callable[[], float] = time.perf_counter):
        super().__init__()
        self._clock = clock

    def _stamp(self) -> float:
        return self._clock()

    def _elapsed_ms(self, start: float, end: float) -> float:
        return (end - start) * 1000.0


class EventTimer(_StampTimer):
    """Device events (CUDA, or MPS) recorded on the target device's current stream (the one
    the step's kernels go to); one synchronisation, in ``collect``, per step.

    The stream is named explicitly: ``Event.record()`` without one records on the current
    *device's* stream, which is another GPU's when the target is not the current device.
    Events are reused between steps (each ``collect`` waits for all of them), so a step's
    marks allocate nothing after the first step.
    """

    def __init__(self, device: torch.device | str = "cuda") -> None:
        super().__init__()
        self.device = torch.device(device)
        self._pool: list = []

    def _new_event(self):
        if self.device.type == "mps":
            return torch.mps.Event(enable_timing=True)
        return torch.cuda.Event(enable_timing=True)

    def _record(self, event) -> None:
        if self.device.type == "mps":
            event.record()
        else:
            event.record(torch.cuda.current_stream(self.device))

    def _stamp(self):
        index = len(self._marks)
        if index == len(self._pool):
            self._pool.append(self._new_event())
        event = self._pool[index]
        self._record(event)
        return event

    def _wait(self, last) -> None:
        last.synchronize()

    def _elapsed_ms(self, start, end) -> float:
        return start.elapsed_time(end)


def on_device(device: torch.device):
    """Make a CUDA ``device`` the current one (kernels and events default to it); a no-op
    context elsewhere."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def make_timer(device: torch.device | str) -> PhaseTimer:
    """The correct timer for a device: device events on CUDA/MPS, ``perf_counter`` on CPU."""
    device = torch.device(device)
    return EventTimer(device) if device.type in ("cuda", "mps") else PerfCounterTimer()


# ------------------------------------------------------------------------------ the step
def make_optimizer(model: nn.Module, name: str, device: torch.device) -> torch.optim.Optimizer:
    """AdamW or SGD with momentum; fused kernels on CUDA, multi-tensor (foreach) elsewhere.

    The fused CUDA kernels also take GradScaler's inf check and unscale on the device, so the
    fp16 optimizer step needs no host synchronisation.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    impl = {"fused": True} if device.type == "cuda" else {"foreach": True}
    if name == "adamw":
        return torch.optim.AdamW(params, lr=3e-4, weight_decay=0.1, **impl)
    if name == "sgd":
        return torch.optim.SGD(params, lr=1e-2, momentum=0.9, **impl)
    raise ValueError(f"unknown optimizer {name!r}; allowed: adamw, sgd")


def compile_model(model: nn.Module, mode: str) -> None:
    """``torch.compile`` ``model`` in place (``nn.Module.compile``: the module, its attributes
    and its parameters stay what they were); compilation itself happens in the first step.

    Dynamo's caches are emptied first: in a warm worker a previous run's graphs would
    otherwise be reused (no compile to report) or, past dynamo's recompile limit, the model
    would silently run eager. Inductor's on-disk cache is kept, as it is for any user: a
    configuration compiled before on this machine compiles faster.
    """
    import torch._dynamo

    torch._dynamo.reset()
    model.compile(mode=mode)


class TrainingStep:
    """One optimizer step of ``config`` on ``device``: the only training code path.

    Builds, once: the checkpointing policy applied to ``model``'s blocks (or the offloading
    context each forward runs in), ``torch.compile`` when asked, the optimizer,
    the fp16 ``GradScaler`` and ``batches`` (``config.accum`` micro-batches of
    ``config.batch`` samples, made on the device so no copy is ever timed).
    """

    def __init__(self, model: nn.Module, make_batch: Callable, config, device: torch.device | str):
        self.config = config
        self.device = torch.device(device)
        self.policy = checkpointing.make_policy(config.ckpt, config.k)
        self.model = model.to(self.device)
        # What checkpointing wrapped (None without it): results record it.
        self.checkpointed = self.policy.apply(self.model, config.blocks)
        self.model.train()
        if config.compile != "none":
            compile_model(self.model, config.compile)
        self.optimizer = make_optimizer(self.model, config.optimizer, self.device)
        self.autocast_dtype = AUTOCAST_DTYPES[config.precision]
        # fp16 always with dynamic loss scaling: its gradients underflow without it.
        self.scaler = torch.amp.GradScaler(self.device.type) if config.precision == "fp16" else None
        self.batches = [tuple(make_batch(config.batch, self.device)) for _ in range(config.accum)]

    def autocast(self):
        """Autocast context for the precision (a no-op context for fp32)."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def run(self, timer: PhaseTimer | None = None) -> torch.Tensor:
        """One optimizer step; returns the step's mean loss as a detached device tensor.

        Nothing here reads a value back to the host, so the only synchronisation is the one
        the timer itself needs (in ``timer.collect()``).
        """
        timer = timer or NullTimer()
        accum = len(self.batches)
        losses = []
        timer.mark("start")
        for batch in self.batches:
            with self.autocast(), self.policy.forward_context(self.device):
                # Dividing by accum makes the summed micro-batch gradients equal the
                # gradient of the mean loss over the effective batch.
                loss = self.model(*batch) / accum
            timer.mark("forward")
            (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
            timer.mark("backward")
            losses.append(loss.detach())
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
            self.scaler.step(self.optimizer)  # skipped when unscale_ found inf/NaN
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        timer.mark("optimizer")
        return torch.stack(losses).sum() if accum > 1 else losses[0]


def build_step(config) -> TrainingStep:
    """The config's ``TrainingStep`` on its device, as every benchmark builds it: seeded,
    parameters created on the device (not copied there), batches made there."""
    device = torch.device(resolve_device(config.device))
    torch.manual_seed(config.seed)
    with device:
        model, make_batch = models.build(config.model, config.overrides)
    return TrainingStep(model, make_batch, config, device)
