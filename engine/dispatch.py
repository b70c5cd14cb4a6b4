"""Where a sweep's configurations run: the executors ``sweep.run_sweep`` hands them to.

An executor is called as ``execute(configs, sweep_id, emit, stop)``: it runs every config,
calls ``emit(index, item)`` (``index`` 0-based into ``configs``; ``item`` a ``Progress`` or,
once per config, its ``Result``; for a result ``emit`` returns once the caller has stored it,
or the sweep is stopping) from whatever thread it likes, stops starting configs and
cancels the running ones once ``stop`` is set, and returns when nothing of its own runs any
more. ``run_sweep`` turns the emitted items into the caller's callbacks, on the caller's
thread, in the order they came: results stream in finishing order.

``LocalExecutor`` runs on this machine with one *lane* per physical device: one warm worker
and one device queue per GPU, keyed by its UUID, so a box with several GPUs measures one
configuration per GPU at once; a config for ``auto`` or ``cuda`` goes to whichever GPU
lane is free, ``cuda:N`` to that GPU's lane. A run on the host's CPU (or MPS, which shares
the host's memory) only starts when no other lane is busy and holds the others back while
it runs: it uses every core that the GPU runs' host threads need too. With one device
there is one lane, and the sweep is what it always was: one config after another.

``ray_executor.RayExecutor`` runs each config as a Ray task somewhere on a cluster.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Callable, Protocol

from . import devices
from .config import BenchConfig
from .progress import Progress
from .results import Result

Emit = Callable[[int, Progress | Result], None]
# Device names that ask for a GPU, not one GPU: on a box with several, any free one.
ANY_GPU = ("auto", "cuda")
POLL_S = 0.05


class ExecutorError(Exception):
    """An executor cannot run here: what it needs is missing or unreachable (Ray is not
    installed, the cluster does not answer). Raised before any config runs."""


class Executor(Protocol):
    """Runs a sweep's configs (see the module's docstring for the contract)."""

    def __call__(self, configs: list[BenchConfig], sweep_id: str, emit: Emit, stop: threading.Event) -> None: ...


class Runner(Protocol):
    """What runs a config on a lane: ``engine.worker.Worker`` (its ``run``)."""

    def run(self, config: BenchConfig, progress, cancel, sweep_id: str | None, device: str | None) -> Result: ...


@dataclass(frozen=True)
class Lane:
    """One physical device of this machine as a sweep uses it.

    ``key`` names the device (a GPU's UUID, ``cpu``, ``mps``); ``device`` is what its runs are
    given as their device (``cuda:1``: the worker's process sees only that GPU); ``runner`` the
    warm worker that runs them; ``any_gpu``: it takes configs that ask for any GPU (``auto``,
    ``cuda``); ``exclusive``: it runs only while no other lane does (the host's CPU, or a
    data-parallel run's several GPUs); ``gpus``: the GPUs each of its runs holds (a lane for
    runs of ``nproc`` ranks on CUDA holds ``nproc``, from ``device`` on).
    """

    key: str
    device: str
    runner: Runner
    any_gpu: bool = False
    exclusive: bool = False
    gpus: int = 1

    def takes(self, config: BenchConfig) -> bool:
        """Whether ``config`` may run on this lane."""
        if _gpus_of(config) != self.gpus:
            return False
        if self.any_gpu and config.device in ANY_GPU:
            return True
        return _first_device(config) == self.device


def _first_device(config: BenchConfig) -> str:
    """The device ``config`` runs on, a CUDA one by index (``cuda`` is ``cuda:0``)."""
    device = devices.resolve_device(config.device)
    return "cuda:0" if device == "cuda" else device


def _gpus_of(config: BenchConfig) -> int:
    """GPUs a run of ``config`` holds here: one per rank on CUDA; a CPU run's ranks share the host."""
    return config.nproc if _first_device(config).startswith("cuda") else 1


def local_lanes(configs: list[BenchConfig]) -> list[Lane]:
    """This machine's lanes for ``configs``: one per CUDA GPU (each with the shared warm worker
    of its UUID), plus one for each other device the configs resolve to (``cpu``, ``mps``)."""
    from .worker import shared_worker

    lanes = []
    for gpu in devices.cuda_gpus():
        device = f"cuda:{gpu.index}"
        lanes.append(Lane(gpu.key, device, shared_worker(device), any_gpu=True))
    host = {devices.resolve_device(config.device) for config in configs} - {lane.device for lane in lanes}
    for device in sorted(d for d in host if not d.startswith("cuda")):
        lanes.append(Lane(device, device, shared_worker(device), exclusive=True))
    # A data-parallel run holds its GPUs (from its device on) alone: while it runs no
    # single-GPU lane starts, so no GPU ever has two runs.
    for device, gpus in sorted({(_first_device(c), _gpus_of(c)) for c in configs if _gpus_of(c) > 1}):
        key = ",".join(devices.device_keys(device, gpus))
        lanes.append(Lane(key, device, shared_worker(device, gpus), exclusive=True, gpus=gpus))
    return lanes


class LocalExecutor:
    """Runs a sweep on this machine's lanes, one thread per lane (``lanes``: a factory of the
    lanes for a list of configs; default ``local_lanes``, a test's stand-in devices otherwise)."""

    def __init__(self, lanes: Callable[[list[BenchConfig]], list[Lane]] = local_lanes) -> None:
        self._lanes = lanes

    def __call__(self, configs: list[BenchConfig], sweep_id: str, emit: Emit, stop: threading.Event) -> None:
        lanes = self._lanes(configs)
        pending = list(range(len(configs)))  # indices not started yet, in sweep order
        for index in list(pending):
            if not any(lane.takes(configs[index]) for lane in lanes):
                pending.remove(index)
                have = ", ".join(lane.device for lane in lanes) or "none"
                emit(index, _failed(configs[index], sweep_id, devices.resolve_device(configs[index].device),
                                    f"no device {configs[index].device} on this machine (devices: {have})"))
        busy: set[str] = set()  # keys of lanes running a config
        exclusive_busy = False
        changed = threading.Condition()

        def next_for(lane: Lane) -> int | None:
            """The first pending config this lane may start now; -1: none will ever come."""
            mine = [index for index in pending if lane.takes(configs[index])]
            if not mine or stop.is_set():
                return -1
            if exclusive_busy or (lane.exclusive and busy):
                return None
            return mine[0]

        def work(lane: Lane) -> None:
            nonlocal exclusive_busy
            while True:
                with changed:
                    while (index := next_for(lane)) is None:
                        changed.wait(POLL_S)  # a stop is noticed within POLL_S
                    if index < 0:
                        return
                    pending.remove(index)
                    busy.add(lane.key)
                    exclusive_busy = exclusive_busy or lane.exclusive
                try:
                    try:
                        result = lane.runner.run(configs[index], lambda event, i=index: emit(i, event), stop, sweep_id,
                                                 device=lane.device)
                    except Exception as exc:  # noqa: BLE001 - a lane's failure is its config's result
                        result = _failed(configs[index], sweep_id, lane.device, f"{type(exc).__name__}: {exc}")
                    emit(index, result)
                finally:
                    with changed:
                        busy.discard(lane.key)
                        exclusive_busy = exclusive_busy and not lane.exclusive
                        changed.notify_all()

        threads = [threading.Thread(target=work, args=(lane,), name=f"tradeoff-lab-lane-{lane.key}", daemon=True)
                   for lane in lanes]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()


def _failed(config: BenchConfig, sweep_id: str, device: str, error: str) -> Result:
    """An error result for a config that could not be run on ``device``."""
    from .worker import fallback_env

    return Result.new(config, "error", fallback_env(device), error=error, sweep_id=sweep_id)
