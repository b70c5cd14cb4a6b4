"""Sweeps on a Ray cluster: every configuration is a Ray task asking for the GPUs its run
occupies (``config.gpus_needed``), so Ray spreads a sweep over every GPU of every node.

Inside a task the run goes through the same worker isolation as on one machine
(``engine.worker``): an OOM, crash or hang is a result, never a lost task, and the run waits
in the device queue of the node it landed on (the queue is a lock per machine, so a run
started there from a terminal or the dashboard is not timed alongside it). Results travel
back as plain result objects, are read with the results schema's own reader, and reach the
sweep's ``on_result`` as they finish: stored and shown like any local run.

Ray is optional (requirements-ray.txt) and imported only when this executor is made.
"""
from __future__ import annotations

import os
import socket
import threading

from . import devices
from .config import BenchConfig, gpus_needed
from .dispatch import Emit, ExecutorError
from .results import Result, ResultFormatError

INSTALL_HINT = "the ray executor needs Ray: python3 -m pip install -r requirements-ray.txt"
POLL_S = 0.05
CONNECT_TIMEOUT_S = 10.0
_ENGINE_DIR = os.path.dirname(os.path.abspath(__file__))


class RayExecutor:
    """Runs a sweep as Ray tasks (a ``dispatch.Executor``).

    ``address``: the cluster to join (``auto``, ``ray://host:10001``, ``host:6379``); None
    joins ``$RAY_ADDRESS`` when set, else starts a Ray on this machine. A Ray already
    initialised in this process is used as it is. Raises ExecutorError when Ray is not
    installed.
    """

    def __init__(self, address: str | None = None, **init_options) -> None:
        try:
            import ray
        except ImportError:
            raise ExecutorError(INSTALL_HINT) from None
        self._ray = ray
        self._address = address
        self._init_options = init_options  # more ``ray.init`` options for a Ray started here (tests: num_cpus)

    def connect(self) -> None:
        """Join (or start) the cluster now, so an unreachable one fails before anything runs;
        ExecutorError naming the address otherwise. The engine package travels with the
        tasks, so a node needs only the requirements installed, not this checkout."""
        ray = self._ray
        address = self._address or os.environ.get("RAY_ADDRESS") or None
        if address is not None:
            _check_reachable(address)
        if ray.is_initialized():
            return
        # Workers' output would reach this process's stdout, which carries --json results.
        extra = dict(self._init_options)
        options: dict = {"log_to_driver": False, "logging_level": "WARNING",
                         "runtime_env": {"py_modules": [_ENGINE_DIR], **extra.pop("runtime_env", {})}}
        if address is None:
            options["include_dashboard"] = False  # a private Ray for this sweep: no web server
            options.update(extra)
        try:
            ray.init(address=address, **options)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            where = address or "this machine"
            raise ExecutorError(f"cannot start or reach Ray at {where}: {str(exc).strip().splitlines()[0]}") from None

    def __call__(self, configs: list[BenchConfig], sweep_id: str, emit: Emit, stop: threading.Event) -> None:
        ray = self._ray
        self.connect()
        # A run's GPUs are on one node: a task asking for more than any node has would wait forever.
        most_gpus = max((node["Resources"].get("GPU", 0) for node in ray.nodes() if node["Alive"]), default=0)
        task = ray.remote(_run_in_task)
        groups, refs = [], {}
        try:
            for index, config in enumerate(configs):
                # "auto" means a GPU wherever there is one: on a cluster without any, the CPU.
                gpus = gpus_needed(config) if most_gpus or config.device != "auto" else 0
                if gpus > most_gpus:
                    emit(index, _failed(config, sweep_id, f"needs {gpus} GPU(s) on one node; the Ray cluster's "
                                                          f"largest node has {most_gpus:g}"))
                    continue
                # No retries: a run that killed its Ray worker would only do it again.
                options: dict = {"num_gpus": gpus, "max_retries": 0}
                if gpus > 1:
                    groups.append(self._reserve(gpus, options))
                refs[task.options(**options).remote(config.to_dict(), sweep_id, gpus)] = index
            pending, cancelled = list(refs), False
            while pending:
                if stop.is_set() and not cancelled:
                    for ref in pending:
                        # force: a running task's Ray worker is killed, and its benchmark
                        # worker dies with it (a worker never outlives its caller).
                        ray.cancel(ref, force=True)
                    cancelled = True
                done, pending = ray.wait(pending, num_returns=len(pending), timeout=POLL_S, fetch_local=True)
                for ref in done:
                    index = refs[ref]
                    emit(index, self._result(ref, configs[index], sweep_id, cancelled))
        finally:
            if groups:
                from ray.util.placement_group import remove_placement_group

                for group in groups:
                    remove_placement_group(group)

    def _reserve(self, gpus: int, options: dict):
        """A placement group holding ``gpus`` GPUs on one node for a run of several ranks,
        and the task's ``options`` scheduled into it. The ranks of one run are processes of
        one worker, so they share a node, and a Ray task draws its resources from a single
        bundle: one bundle of ``gpus`` GPUs, packed strictly."""
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        group = placement_group([{"GPU": gpus, "CPU": 1}], strategy="STRICT_PACK")
        options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(group)
        return group

    def _result(self, ref, config: BenchConfig, sweep_id: str, cancelled: bool) -> Result:
        """The task's result, read as any results file is; a task Ray lost becomes an error
        (or "cancelled", once the sweep was stopped) result."""
        ray = self._ray
        try:
            return Result.from_dict(ray.get(ref), "a Ray task's result")
        except ray.exceptions.RayError as exc:
            if cancelled:
                return _failed(config, sweep_id, "cancelled; its Ray task was stopped", "cancelled")
            lines = str(exc).strip().splitlines() or [""]
            return _failed(config, sweep_id, f"the Ray task failed: {type(exc).__name__}: {lines[0]}")
        except ResultFormatError as exc:
            return _failed(config, sweep_id, str(exc))


def _check_reachable(address: str) -> None:
    """ExecutorError at once when nothing answers at a ``host:port`` or ``ray://host:port``
    address (Ray itself retries for minutes); ``auto`` is left to Ray, which says at once
    when no cluster runs on this machine."""
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        raise ExecutorError(f"cannot reach Ray at {address}: {exc.strerror or exc}") from None


def _failed(config: BenchConfig, sweep_id: str, message: str, status: str = "error") -> Result:
    """A result for a config whose task gave none."""
    from .worker import fallback_env

    device = "cuda" if gpus_needed(config) else config.device
    return Result.new(config, status, fallback_env(device), error=message, sweep_id=sweep_id)


_task_visible: list[str | None] = [None]  # CUDA_VISIBLE_DEVICES the device list was probed under


def _run_in_task(config_data: dict, sweep_id: str, gpus: int) -> dict:
    """One configuration inside a Ray task: run in this node's warm worker of the GPU(s) Ray
    gave the task (Ray sets CUDA_VISIBLE_DEVICES to them: the first is this process's ``cuda:0``),
    or on the CPU; the result as a plain dict."""
    from .worker import shared_worker

    config = BenchConfig.from_dict(config_data)
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible != _task_visible[0]:
        # A Ray worker process runs task after task, each on the GPUs Ray assigns it.
        devices.cuda_gpus.cache_clear()
        _task_visible[0] = visible
    device = "cuda:0" if gpus else ("cpu" if config.device == "auto" else config.device)
    # With several GPUs Ray made them this task's cuda:0, cuda:1, ...: the run's ranks take them.
    return shared_worker(device, config.nproc).run(config, sweep_id=sweep_id, device=device).to_dict()
