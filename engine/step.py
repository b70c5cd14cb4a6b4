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
from .config import OPTIMIZER_IMPLS, optimizer_impl_for
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
# torch.optim keyword arguments per implementation: "loop" is the per-parameter reference
# implementation (foreach off, fused unset).
_IMPL_KWARGS = {"fused": {"fused": True}, "foreach": {"foreach": True}, "loop": {"foreach": False}}


def make_optimizer(model: nn.Module, name: str, device: torch.device, impl: str = "auto") -> torch.optim.Optimizer:
    """AdamW, SGD with momentum or Adafactor in implementation ``impl`` ("fused", "foreach",
    "loop", or "auto": ``config.optimizer_impl_for``, fused on CUDA where the optimizer has a
    fused kernel, else foreach).

    The fused CUDA kernels also take GradScaler's inf check and unscale on the device, so the
    fp16 optimizer step needs no host synchronisation.
    """
    if name not in OPTIMIZER_IMPLS:
        raise ValueError(f"unknown optimizer {name!r}; allowed: {', '.join(OPTIMIZER_IMPLS)}")
    if impl not in OPTIMIZER_IMPLS[name]:
        raise ValueError(f"{name} has no {impl!r} implementation; allowed: {', '.join(OPTIMIZER_IMPLS[name])}")
    params = [p for p in model.parameters() if p.requires_grad]
    kwargs = _IMPL_KWARGS[optimizer_impl_for(name, impl, device.type)]
    if name == "adamw":
        return torch.optim.AdamW(params, lr=3e-4, weight_decay=0.1, **kwargs)
    if name == "sgd":
        return torch.optim.SGD(params, lr=1e-2, momentum=0.9, **kwargs)
    return torch.optim.Adafactor(params, lr=1e-2, **kwargs)


def attention_kernel(attention: str):
    """The context that restricts scaled-dot-product attention to one backend
    (``torch.nn.attention.sdpa_kernel``), or a no-op context for "auto" (torch picks)."""
    if attention == "auto":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {"math": SDPBackend.MATH, "flash": SDPBackend.FLASH_ATTENTION,
               "efficient": SDPBackend.EFFICIENT_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}[attention]
    return sdpa_kernel(backend)


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
    context each forward runs in), then ``wrap`` (a data-parallel rank's DDP or FSDP wrapper,
    engine/distributed.py; before the optimizer, which must see FSDP's sharded parameters),
    ``torch.compile`` when asked (of the wrapped model, as torch recommends for DDP), the
    optimizer, the fp16 ``GradScaler`` and ``batches`` (``config.accum`` micro-batches of
    ``config.batch`` samples, made on the device so no copy is ever timed).
    """

    def __init__(self, model: nn.Module, make_batch: Callable, config, device: torch.device | str,
                 wrap: Callable[[nn.Module], nn.Module] | None = None):
        self.config = config
        self.device = torch.device(device)
        self.policy = checkpointing.make_policy(config.ckpt, config.k)
        self.model = model.to(self.device)
        # What checkpointing wrapped (None without it): results record it.
        self.checkpointed = self.policy.apply(self.model, config.blocks)
        if wrap is not None:
            self.model = wrap(self.model)
        self.model.train()
        if config.compile != "none":
            compile_model(self.model, config.compile)
        self.optimizer = make_optimizer(self.model, config.optimizer, self.device, config.optimizer_impl)
        self.autocast_dtype = AUTOCAST_DTYPES[config.precision]
        # fp16 always with dynamic loss scaling: its gradients underflow without it.
        self.scaler = torch.amp.GradScaler(self.device.type) if config.precision == "fp16" else None
        self.batches = [tuple(make_batch(config.batch, self.device)) for _ in range(config.accum)]

    def autocast(self):
        """Autocast context for the precision (a no-op context for fp32)."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    @contextlib.contextmanager
    def _gradient_sync(self, last: bool):
        """Data parallel: gradients are reduced across ranks once per optimizer step, in the
        last micro-batch's backward; the earlier ones only accumulate locally (DDP's
        ``no_sync``, FSDP's ``set_requires_gradient_sync``). Nothing for one process."""
        if last:
            yield
        elif hasattr(self.model, "no_sync"):
            with self.model.no_sync():
                yield
        elif hasattr(self.model, "set_requires_gradient_sync"):
            self.model.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                self.model.set_requires_gradient_sync(True)
        else:
            yield

    def run(self, timer: PhaseTimer | None = None) -> torch.Tensor:
        """One optimizer step; returns the step's mean loss as a detached device tensor.

        Nothing here reads a value back to the host, so the only synchronisation is the one
        the timer itself needs (in ``timer.collect()``).
        """
        timer = timer or NullTimer()
        accum = len(self.batches)
        losses = []
        timer.mark("start")
        # Around backward too: checkpointing recomputes attention there.
        with attention_kernel(self.config.attention):
            for i, batch in enumerate(self.batches):
                with self._gradient_sync(last=i == accum - 1):
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
    parameters created on the device (not copied there), batches made there.

    One process only: a data-parallel config's ranks each build theirs
    (``engine.distributed.build_rank_step``), so a tool that would measure one process of it
    (the memory timeline, the pitfall demo) refuses it rather than show misleading figures.
    """
    if config.distributed:
        from .config import ConfigError

        raise ConfigError("parallel", config.parallel, "none here: this measures one process (data-parallel "
                          "configurations run with `run` and `sweep`)")
    device = torch.device(resolve_device(config.device))
    torch.manual_seed(config.seed)
    with device:
        model, make_batch = models.build(config.model, config.overrides)
    return TrainingStep(model, make_batch, config, device)
