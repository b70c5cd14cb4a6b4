"""Where peak memory goes: params, grads, optimizer state, activations, other.

The breakdown comes from ONE extra training step run under
``torch.distributed._tools.mem_tracker.MemTracker``, after the timed steps, so its
bookkeeping never slows a timed step.

Why MemTracker: it is a ``TorchDispatchMode`` plus module and optimizer hooks that sees
every tensor storage as it is created and freed (weak references), and classifies it by
*role* at that moment: parameters and buffers by module registration, gradients through
gradient hooks, optimizer state through optimizer step hooks, activations as everything
produced in forward and in checkpoint recompute, and "temp" for backward-only tensors
(activation gradients). A ``saved_tensors_hooks`` count sees only what autograd saves (not
outputs still alive, autocast weight copies or backward temporaries), and a hand-written
dispatch-mode counter would need the same role bookkeeping re-implemented; both would be
less accurate. MemTracker works on CPU and CUDA and on CUDA rounds each storage to the
caching allocator's 512-byte blocks. What it cannot see (cuBLAS workspaces and other
allocator-level memory that is not a tensor) is added to ``other`` from
``torch.cuda.max_memory_allocated`` of the same step, so on CUDA the five parts add up to
the allocator's peak for the instrumented step.
"""
from __future__ import annotations

import os

import torch

from .results import BREAKDOWN_KEYS, MemoryBreakdown
from .step import PhaseTimer

# MemTracker role -> breakdown key. Buffers (e.g. BatchNorm statistics), backward-only
# temporaries and external tensors (the input batches) are "other": "activations" is
# what the forward pass keeps alive, the figure checkpointing and precision change.
# "optimizer" is the optimizer state plus, when the peak falls inside optimizer.step, the
# scratch tensors the step allocates (foreach AdamW needs about one params-sized buffer).
_ROLE_TO_KEY = {
    "Parameter": "params",
    "Gradient": "grads",
    "Optstate": "optimizer",
    "Activation": "activations",
    "Buffer": "other",
    "Temp": "other",
    "Other": "other",
}


class _ModuleStatsReset(PhaseTimer):
    """Clears MemTracker's per-module statistics after each micro-batch's backward.

    MemTracker refuses a second forward of the root module inside one tracking session
    (it takes it for the next iteration); with gradient accumulation that second forward
    is part of the same step. Only per-module statistics are cleared: the storage
    bookkeeping and the peak snapshot this breakdown reads are kept.
    """

    def __init__(self, tracker):
        self._tracker = tracker

    def mark(self, phase: str) -> None:
        if phase == "backward":
            self._tracker.reset_mod_stats()


def memory_breakdown(step) -> MemoryBreakdown:
    """Bytes per role at the peak of one instrumented ``step.run()``.

    Runs one real optimizer step (it updates the weights), so call it after timing.
    The values sum to that step's peak: on CPU this is the run's ``peak_allocated_bytes``
    (there is no allocator to ask); on CUDA it equals ``torch.cuda.max_memory_allocated``
    over the step, whose peak statistics this resets.
    """
    from torch.distributed._tools.mem_tracker import MemTracker

    device = step.device
    tracker = MemTracker()
    # Tensors that exist before the step are invisible to the dispatch mode: register them.
    batch_tensors = [t for batch in step.batches for t in batch if isinstance(t, torch.Tensor)]
    tracker.track_external(step.model, step.optimizer, *batch_tensors)
    is_cuda = device.type == "cuda"
    if is_cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    with tracker:
        step.run(_ModuleStatsReset(tracker))
    peak = tracker.get_tracker_snapshot("peak")
    roles = next((snap for dev, snap in peak.items() if dev.type == device.type), {})
    breakdown = dict.fromkeys(BREAKDOWN_KEYS, 0)
    for role, nbytes in roles.items():
        key = _ROLE_TO_KEY.get(getattr(role, "value", role))
        if key is not None:
            breakdown[key] += int(nbytes)
    if is_cuda:
        torch.cuda.synchronize(device)
        untracked = torch.cuda.max_memory_allocated(device) - sum(breakdown.values())
        breakdown["other"] += max(0, untracked)
    return MemoryBreakdown(**breakdown)


def _live_bytes(step) -> int:
    """Bytes of the tensors a step starts from: parameters, buffers, gradients, optimizer
    state and the batches (each storage once)."""
    tensors = [*step.model.parameters(), *step.model.buffers(),
               *(p.grad for p in step.model.parameters() if p.grad is not None),
               *(v for state in step.optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)),
               *(t for batch in step.batches for t in batch if isinstance(t, torch.Tensor))]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def cpu_step_peak_bytes(step) -> int:
    """Peak bytes of live tensors over one ``step.run()`` on the CPU, seen at the allocator:
    the tensors alive when the step starts plus the peak of what the step allocates, from
    the profiler's record of every CPU allocation and free.

    The breakdown's tracker sees tensors made by dispatched operators; code compiled by
    torch.compile allocates its buffers directly and does not run under the tracker at all,
    so for a compiled step this is the peak. For an eager step both agree to within a few
    bytes.
    Runs one real optimizer step: call it after timing.
    """
    from torch.profiler import ProfilerActivity, profile

    # Kineto, the profiler's backend, prints lines of its own on stderr at every start and
    # stop unless told otherwise before its first use (a user's setting wins).
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")
    start = _live_bytes(step)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step.run()
    cpu = torch._C._autograd.DeviceType.CPU
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]" and e.device_type() == cpu),
                    key=lambda e: e.start_ns())
    current = peak = 0
    for event in events:
        current += event.nbytes()  # negative for a free
        peak = max(peak, current)
    return start + peak
