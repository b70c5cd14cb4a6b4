"""Test models for concurrent sweeps (``--model tests.dispatch_models:NAME``).

``rendezvous_oom_above_2``: forward first waits until ``PARTIES`` processes have arrived at
a rendezvous (a directory named by the run's seed, holding one file per arrived process),
then raises ``torch.OutOfMemoryError`` for micro-batches above 2. Two runs of it finish only
if they ran at the same time: the proof of concurrency needs no clock.

``alone``: the first forward of a run announces it in the same kind of directory and watches
it for ``ALONE_S``; it raises if another run of the same seed is in its own first forward
then (two runs measuring one device at once). Runs of different micro-batch sizes tell
themselves apart by it.
"""
from __future__ import annotations

import os
import tempfile
import time

import torch

from tests.helper_models import _make_batch, _OOMAbove

PARTIES = 2
WAIT_S = 30.0
ALONE_S = 1.5


def rendezvous_dir(seed: int) -> str:
    """Where the processes of runs with ``seed`` meet."""
    return os.path.join(tempfile.gettempdir(), f"tradeoff-lab-rendezvous-{seed}")


def _meet() -> None:
    directory = rendezvous_dir(torch.initial_seed())  # the config's seed: a step seeds torch with it
    os.makedirs(directory, exist_ok=True)
    open(os.path.join(directory, str(os.getpid())), "w").close()
    deadline = time.monotonic() + WAIT_S
    while len(os.listdir(directory)) < PARTIES:
        if time.monotonic() > deadline:
            raise RuntimeError(f"rendezvous: the other run never arrived within {WAIT_S:g} s")
        time.sleep(0.01)


class _RendezvousOOMAbove(_OOMAbove):
    def forward(self, x, y):
        _meet()
        return super().forward(x, y)


def rendezvous_oom_above_2():
    """Waits for a second run at a rendezvous, then OOMs for micro-batches above 2."""
    return _RendezvousOOMAbove(2), _make_batch


def _check_alone(batch: int) -> None:
    directory = rendezvous_dir(torch.initial_seed())
    os.makedirs(directory, exist_ok=True)
    running, done = os.path.join(directory, f"running-{batch}"), os.path.join(directory, f"done-{batch}")
    if os.path.exists(done):
        return  # this run was checked at its first forward
    open(running, "w").close()
    deadline = time.monotonic() + ALONE_S
    while time.monotonic() < deadline:
        others = [name for name in os.listdir(directory) if name.startswith("running-") and name != f"running-{batch}"]
        if others:
            raise RuntimeError(f"another run measured the same device at the same time: {others[0]}")
        time.sleep(0.01)
    os.rename(running, done)


class _Alone(_OOMAbove):
    def forward(self, x, y):
        _check_alone(x.shape[0])
        return super().forward(x, y)


def alone():
    """Raises if another run of the same seed is in its first forward at the same time."""
    return _Alone(2**30), _make_batch
