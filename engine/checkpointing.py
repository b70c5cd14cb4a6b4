"""Activation-checkpointing policies as strategy objects applied to a model's blocks (and
activation offloading, which keeps the same place in a config: what happens to activations).

Every policy wraps some of the blocks ``models.find_blocks`` finds (every stage of a staged
model, or the user's ``--blocks``) in a ``CheckpointedBlock`` that runs
the block under non-reentrant ``torch.utils.checkpoint`` (the reentrant variant is being
deprecated, does not work with ``torch.autograd.grad`` and needs an input that requires
grad; the non-reentrant one also stops recomputing as soon as backward has what it needs). The wrapped blocks keep
their parameters in the same order, so gradients of differently checkpointed copies of one
model can be compared parameter by parameter.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Callable, ContextManager, Iterator

import torch
import torch.nn as nn
import torch.utils.checkpoint as torch_ckpt

from . import models
from .results import Checkpointed


class CheckpointedBlock(nn.Module):
    """Runs ``block`` under non-reentrant ``torch.utils.checkpoint``.

    ``context_fn`` (optional) is torch's hook returning ``(forward_ctx, recompute_ctx)``;
    selective checkpointing uses it to decide per operator what to save. While
    ``observe_recompute`` is active, each recompute of the block also runs inside the
    observer's context (entered before, i.e. underneath, the policy's own recompute
    context, so an observer sees only the ops that really run again).
    """

    def __init__(self, block: nn.Module, context_fn: Callable | None = None):
        super().__init__()
        self.block = block
        self.policy_context_fn = context_fn or torch_ckpt.noop_context_fn
        self.recompute_observer: Callable[[], ContextManager] | None = None

    def _context_fn(self):
        forward_ctx, recompute_ctx = self.policy_context_fn()
        # A recompute reruns BatchNorm's forward: without this its running statistics would
        # be updated twice per micro-batch.
        recompute_ctx = _nested(_batch_norm_stats_frozen(self.block), recompute_ctx)
        if self.recompute_observer is None:
            return forward_ctx, recompute_ctx
        return forward_ctx, _nested(self.recompute_observer(), recompute_ctx)

    def forward(self, *args, **kwargs):
        if not torch.is_grad_enabled():
            return self.block(*args, **kwargs)
        # Under torch.compile only the policy's own context_fn goes in (none for full
        # checkpointing): dynamo takes it as a plain function (a bound method loses its
        # ``self``, a stored noop is refused), the partitioner decides from it what
        # to recompute, and its recompute never replays BatchNorm's running-statistics
        # update; the recompute observer only ever runs eager (under a dispatch mode dynamo
        # does not compile).
        if torch.compiler.is_compiling():
            policy = {} if self.policy_context_fn is torch_ckpt.noop_context_fn else {"context_fn": self.policy_context_fn}
            return torch_ckpt.checkpoint(self.block, *args, use_reentrant=False, **policy, **kwargs)
        return torch_ckpt.checkpoint(self.block, *args, use_reentrant=False, context_fn=self._context_fn, **kwargs)


@contextlib.contextmanager
def _nested(outer: ContextManager, inner: ContextManager) -> Iterator[None]:
    with outer, inner:
        yield


@contextlib.contextmanager
def _batch_norm_stats_frozen(block: nn.Module) -> Iterator[None]:
    """While active, the block's BatchNorm layers run exactly as in the original forward
    (batch statistics, the same saved tensors, which checkpoint's recompute must match) but
    leave their running statistics as they are: momentum 0 makes the update an identity, and
    the batch counter is put back."""
    layers = [m for m in block.modules()
              if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats]
    saved = [(m.momentum, None if m.num_batches_tracked is None else m.num_batches_tracked.clone()) for m in layers]
    for layer in layers:
        layer.momentum = 0.0
    try:
        yield
    finally:
        for layer, (momentum, count) in zip(layers, saved):
            layer.momentum = momentum
            if count is not None:
                layer.num_batches_tracked.copy_(count)


@contextlib.contextmanager
def observe_recompute(model: nn.Module, make_context: Callable[[], ContextManager]) -> Iterator[None]:
    """While active, every recompute of a checkpointed block in ``model`` runs inside a fresh
    ``make_context()`` (e.g. a FLOP counter for the recompute alone)."""
    wrappers = [m for m in model.modules() if isinstance(m, CheckpointedBlock)]
    for w in wrappers:
        w.recompute_observer = make_context
    try:
        yield
    finally:
        for w in wrappers:
            w.recompute_observer = None


class CheckpointPolicy:
    """Base policy: ``apply(model)`` wraps the blocks ``selects(i, n)`` picks."""

    name = "none"

    def selects(self, index: int, count: int) -> bool:
        """Whether block ``index`` of ``count`` is checkpointed."""
        return False

    def context_fn(self) -> Callable | None:
        """``context_fn`` for ``torch.utils.checkpoint`` (None: save nothing inside the block)."""
        return None

    def forward_context(self, device: torch.device) -> ContextManager:
        """The context the training step runs each forward in (nothing for block policies)."""
        return contextlib.nullcontext()

    def apply(self, model: nn.Module, patterns: str | None = None) -> Checkpointed | None:
        """Wrap the selected blocks of ``model`` in place (``patterns``: the user's ``--blocks``);
        returns what was wrapped (None for a policy that wraps no block). Raises ValueError if
        the model has no blocks."""
        if self.name in ("none", "offload"):
            return None
        blocks = models.find_blocks(model, patterns)
        if blocks is None:
            raise ValueError(
                f"checkpointing {self.name!r} found no blocks" + (f" matching --blocks {patterns!r}" if patterns else
                ": give the model a `blocks` nn.ModuleList, or name its blocks with --blocks"))
        chosen = [i for i in range(len(blocks.paths)) if self.selects(i, len(blocks.paths))]
        for i in chosen:
            parent_path, _, name = blocks.paths[i].rpartition(".")
            parent = model.get_submodule(parent_path)
            setattr(parent, name, CheckpointedBlock(blocks.modules[i], self.context_fn()))
        wrapped = [blocks.modules[i] for i in chosen]
        return Checkpointed(len(chosen), len(blocks.paths), tuple(blocks.classes), models.param_share(model, wrapped),
                            blocks.source, tuple(blocks.paths[i] for i in chosen))

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class NoCheckpoint(CheckpointPolicy):
    """Keep every activation (the baseline)."""

    name = "none"


class EveryKCheckpoint(CheckpointPolicy):
    """Checkpoint blocks 0, k, 2k, ... (``k == 1`` checkpoints every block: ``full``)."""

    def __init__(self, k: int = 1):
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self.k = k
        self.name = "full" if k == 1 else "every-k"

    def selects(self, index: int, count: int) -> bool:
        return index % self.k == 0

    def __repr__(self) -> str:
        return f"EveryKCheckpoint(k={self.k})"


# Selective recomputation as torch's own partitioner and torchtitan define it (after
# Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models",
# section 4.2): keep the outputs of the expensive operators (linear-layer matmuls,
# convolutions and the fused attention kernels) and recompute the cheap pointwise ones
# (LayerNorm, GELU, residual adds) whose saved inputs dominate activation memory relative
# to their compute. Every SDPA kernel is listed, the CUDA flash/memory-efficient/cuDNN ones
# and the CPU flash one, so attention never runs again in backward whichever backend
# F.scaled_dot_product_attention picks; bmm is left out because outside those fused kernels
# it only appears inside an unfused attention, which is cheap to recompute at small sizes.
SAVED_OPS = frozenset(
    {
        torch.ops.aten.mm.default,
        torch.ops.aten.addmm.default,
        torch.ops.aten._scaled_mm.default,
        torch.ops.aten.convolution.default,
        torch.ops.aten._scaled_dot_product_flash_attention.default,
        torch.ops.aten._scaled_dot_product_efficient_attention.default,
        torch.ops.aten._scaled_dot_product_cudnn_attention.default,
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
    }
)


def _save_expensive_outputs(ctx, op, *args, **kwargs):
    if op in SAVED_OPS:
        return torch_ckpt.CheckpointPolicy.MUST_SAVE
    return torch_ckpt.CheckpointPolicy.PREFER_RECOMPUTE


class SelectiveCheckpoint(CheckpointPolicy):
    """Every block, saving matmul, convolution and attention outputs and recomputing
    everything else."""

    name = "selective"

    def selects(self, index: int, count: int) -> bool:
        return True

    def context_fn(self) -> Callable:
        # torch calls this on every forward, so each forward gets fresh caching contexts.
        return functools.partial(torch_ckpt.create_selective_checkpoint_contexts, _save_expensive_outputs)


class OffloadActivations(CheckpointPolicy):
    """Recompute nothing: every tensor autograd saves during forward is copied to host memory
    and copied back when backward needs it (``torch.autograd.graph.save_on_cpu``).

    On CUDA the host copies are pinned, so the copies both ways run asynchronously; on a CPU
    the host *is* the device: pinning means nothing (and needs CUDA), a CPU tensor is kept as
    it is, and nothing is saved: results say so (measure.py).
    """

    name = "offload"

    def forward_context(self, device: torch.device) -> ContextManager:
        return torch.autograd.graph.save_on_cpu(pin_memory=device.type == "cuda")


def make_policy(ckpt: str, k: int = 2) -> CheckpointPolicy:
    """The policy for a config's ``ckpt`` value (``none``, ``full``, ``every-k``, ``selective``,
    ``offload``)."""
    if ckpt == "none":
        return NoCheckpoint()
    if ckpt == "offload":
        return OffloadActivations()
    if ckpt == "full":
        return EveryKCheckpoint(1)
    if ckpt == "every-k":
        return EveryKCheckpoint(k)
    if ckpt == "selective":
        if not hasattr(torch_ckpt, "create_selective_checkpoint_contexts"):
            raise RuntimeError("selective checkpointing needs torch >= 2.4 (create_selective_checkpoint_contexts)")
        return SelectiveCheckpoint()
    raise ValueError(f"unknown checkpointing policy {ckpt!r}; allowed: none, full, every-k, selective, offload")
