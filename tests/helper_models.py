"""Misbehaving test models for the user-model contract ``build() -> (model, make_batch)``.

Use them as ``--model tests.helper_models:NAME`` / ``BenchConfig(model="tests.helper_models:NAME")``.
The misbehaviour happens in ``forward``/``backward``, never in the builder, because
BenchConfig validation calls the builder (on the meta device) in the caller's process.

- ``oom_above_2``, ``oom_above_4``: forward raises ``torch.OutOfMemoryError`` when the
  micro-batch is larger than 2 / 4 (a fixed threshold per builder, so a warm worker
  started earlier sees the same behaviour as a fresh one).
- ``exits``: forward calls ``os._exit(3)`` (the worker dies without a traceback).
- ``hangs``: forward sleeps for an hour.
- ``big_alloc``: forward allocates 1 GiB: fine without a cap, OOM under a smaller CPU cap.
- ``sleepy_backward``: backward sleeps 50 ms, forward is cheap (timing attribution tests).
- ``oom_on_rank_1``, ``hangs_on_rank_1``: data-parallel ranks (``RANK`` set by the launcher)
  record their pid under ``rank_pid_dir(<the worker's pid>)``; rank 1's forward raises
  ``torch.OutOfMemoryError`` / sleeps for an hour.
- ``returns_model_only``, ``returns_wrong_types``, ``builder_raises``: builders that break
  the contract, for BenchConfig's validation.
"""
from __future__ import annotations

import os
import tempfile
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

FEATURES = 16
SLEEP_S = 0.05
BIG_ALLOC_BYTES = 1024**3


def _make_batch(batch_size: int, device: torch.device) -> tuple:
    x = torch.randn(batch_size, FEATURES, device=device)
    y = torch.randn(batch_size, 1, device=device)
    return x, y


class _Tiny(nn.Module):
    """A one-layer regression model; subclasses add the misbehaviour in ``forward``."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(FEATURES, 1)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(self.fc(x), y)


class _OOMAbove(_Tiny):
    def __init__(self, limit: int):
        super().__init__()
        self.limit = limit

    def forward(self, x, y):
        if x.shape[0] > self.limit:
            raise torch.OutOfMemoryError(f"test model: micro-batch {x.shape[0]} > {self.limit} is out of memory")
        return super().forward(x, y)


def oom_above_2():
    """Raises torch.OutOfMemoryError in forward for micro-batches above 2."""
    return _OOMAbove(2), _make_batch


def oom_above_4():
    """Raises torch.OutOfMemoryError in forward for micro-batches above 4."""
    return _OOMAbove(4), _make_batch


class _Exits(_Tiny):
    def forward(self, x, y):
        os._exit(3)


def exits():
    """Kills its own process with exit code 3 in forward."""
    return _Exits(), _make_batch


class _Hangs(_Tiny):
    def forward(self, x, y):
        time.sleep(3600)
        return super().forward(x, y)


def hangs():
    """Sleeps for an hour in forward (to be killed by a timeout or cancel)."""
    return _Hangs(), _make_batch


class _BigAlloc(_Tiny):
    def forward(self, x, y):
        # Unfilled: the CPU cap limits address space, so reserving 1 GiB is enough to hit
        # it, and without a cap the untouched pages cost no RAM or time.
        torch.empty(BIG_ALLOC_BYTES, dtype=torch.uint8, device=x.device)
        return super().forward(x, y)


def big_alloc():
    """Allocates 1 GiB in every forward: OOM under a CPU memory cap below that."""
    return _BigAlloc(), _make_batch


class _HugeAlloc(_Tiny):
    def forward(self, x, y):
        torch.empty(8 * BIG_ALLOC_BYTES, dtype=torch.uint8, device=x.device)  # unfilled: costs no RAM
        return super().forward(x, y)


def huge_alloc():
    """Asks for 8 GiB in every forward: past the address-space guard of a small CPU cap."""
    return _HugeAlloc(), _make_batch


class _SleepInBackward(torch.autograd.Function):
    """Identity in forward; sleeps SLEEP_S in backward (host time, visible on any device)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        time.sleep(SLEEP_S)
        return grad


class _SleepyBackward(_Tiny):
    def forward(self, x, y):
        return F.mse_loss(_SleepInBackward.apply(self.fc(x)), y)


def sleepy_backward():
    """Backward sleeps 50 ms per micro-batch; forward and optimizer are tiny."""
    return _SleepyBackward(), _make_batch


# ----------------------------------------------------------------- contract violations
# For BenchConfig's user-model checks: each must be rejected with ConfigError("model", ...).
def returns_model_only():
    """Returns a bare model instead of (model, make_batch)."""
    return _Tiny()


def returns_wrong_types():
    """Returns a pair that is not (nn.Module, callable)."""
    return object(), 3


def builder_raises():
    """Fails whenever it is called."""
    raise RuntimeError("this builder always fails")


def rank_pid_dir(worker_pid: int) -> str:
    """Where the ranks launched by worker ``worker_pid`` record their pids (one file each)."""
    return os.path.join(tempfile.gettempdir(), "tradeoff-lab-test-ranks", str(worker_pid))


class _Rank1Fails(_Tiny):
    def __init__(self, failure):
        super().__init__()
        self.failure = failure
        # Built in each rank process; a caller validating the config builds it on the meta
        # device, outside any rank (no RANK), and records nothing.
        if "RANK" in os.environ:
            directory = rank_pid_dir(os.getppid())
            os.makedirs(directory, exist_ok=True)
            with open(os.path.join(directory, str(os.getpid())), "w") as f:
                f.write(os.environ["RANK"])

    def forward(self, x, y):
        if os.environ.get("RANK") == "1":
            self.failure()
        return super().forward(x, y)


def _raise_oom():
    raise torch.OutOfMemoryError("test model: rank 1 is out of memory")


def oom_on_rank_1():
    """Rank 1 of a data-parallel run raises torch.OutOfMemoryError in forward."""
    return _Rank1Fails(_raise_oom), _make_batch


def hangs_on_rank_1():
    """Rank 1 of a data-parallel run sleeps for an hour in forward (rank 0 then waits in
    the gradient all-reduce)."""
    return _Rank1Fails(lambda: time.sleep(3600)), _make_batch
