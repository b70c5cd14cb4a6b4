"""The numerical price of a saving: how far a configuration's gradients are from fp32.

``grad_rel_diff(config)`` = ‖g − g_ref‖ / ‖g_ref‖ over all parameters, where g is the
gradient of the first optimizer step of ``config`` and g_ref that of the baseline: the same
config in fp32 without checkpointing or torch.compile, built from the same seed (so the same initial
weights and the same synthetic batch). Both come from the one training step
(``engine/step.py``): an optimizer step pre-hook copies the gradients the optimizer is
about to apply (after accumulation and, for fp16, after GradScaler's unscale), so nothing
here re-implements forward, loss scaling or accumulation.

Checkpointing recomputes the same operations, so on CPU it changes nothing (0 exactly);
bf16/fp16 give a small non-zero difference; on a GPU non-deterministic kernels (atomic
adds in embedding backward) give a noise floor around 1e-7 even for identical configs, so a
checkpointed run's difference at that level means "no numerical cost"; the baseline itself
is 0 by definition.
"""
from __future__ import annotations

import math

from .config import BenchConfig
from .results import is_oom

BASELINE = {"precision": "fp32", "ckpt": "none", "compile": "none"}


def baseline_config(config: BenchConfig) -> BenchConfig:
    """The reference of ``config``: fp32, no checkpointing, eager (not compiled), everything
    else equal."""
    return config.replace(**BASELINE)


def first_step_grads(config: BenchConfig) -> list | None:
    """fp32 CPU copies of the gradients the first optimizer step of ``config`` applies
    (a zero tensor for a parameter without gradient); None when they are not finite
    (an fp16 step GradScaler skips)."""
    import torch

    from .step import build_step

    step = build_step(config)
    params = [p for group in step.optimizer.param_groups for p in group["params"]]
    captured: list = []

    def capture(optimizer, args, kwargs):
        # Called inside optimizer.step(), i.e. after backward (and unscale_): the exact
        # gradients this step uses. Copied to the host so the device keeps no second set.
        captured[:] = [
            (p.grad.detach().float() if p.grad is not None else torch.zeros_like(p, dtype=torch.float32)).cpu()
            for p in params
        ]

    handle = step.optimizer.register_step_pre_hook(capture)
    try:
        step.run()
    finally:
        handle.remove()
    if not captured or not all(bool(torch.isfinite(g).all()) for g in captured):
        return None
    return captured


def rel_diff(grads: list, reference: list) -> float:
    """‖g − g_ref‖ / ‖g_ref‖ over all tensors (in float64); inf when g_ref is zero."""
    num = sum(float((g.double() - r.double()).pow(2).sum()) for g, r in zip(grads, reference, strict=True))
    den = sum(float(r.double().pow(2).sum()) for r in reference)
    return math.sqrt(num / den) if den > 0 else math.inf


def grad_rel_diff(config: BenchConfig) -> tuple[float | None, str | None]:
    """(grad_rel_diff of ``config`` against its fp32 baseline, a warning or None).

    None with a warning when either side does not fit in memory or its gradients are not
    finite; other exceptions propagate. Runs two extra optimizer steps on fresh models:
    call it after (never between) timed steps, with the benchmark's own model freed.
    The baseline itself is 0 by definition, without running anything: measured, it would
    show the GPU's noise floor (about 1e-7 from non-deterministic kernels), not a cost.
    """
    if config == baseline_config(config):
        return 0.0, None
    try:
        reference = first_step_grads(baseline_config(config))
        if reference is None:
            return None, "grad_rel_diff: the fp32 baseline's gradients are not finite"
        grads = first_step_grads(config)
    except Exception as exc:
        if not is_oom(exc):
            raise
        _release_cuda_cache()
        return None, "grad_rel_diff: not measured, the fp32/no-checkpointing baseline (or the check) ran out of memory"
    if grads is None:
        return None, "grad_rel_diff: the first step's gradients are not finite (GradScaler skipped it)"
    return rel_diff(grads, reference), None


def _release_cuda_cache() -> None:
    import torch

    if torch.cuda.is_initialized():
        torch.cuda.empty_cache()
