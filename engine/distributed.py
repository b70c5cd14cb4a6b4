"""Data-parallel runs (DDP, FSDP): ``nproc`` ranks launched by torch.distributed's own
launcher, inside the worker.

The worker process becomes the launcher's agent (``elastic_launch``): it starts one rank
process per ``nproc`` (``python -m engine.distributed RUN_DIR``), which rendezvous on this
host, join a process group (gloo on CPU, NCCL on CUDA with GPU ``cuda:<local rank>`` of the
worker's GPUs) and each build the same config's ``TrainingStep`` (engine/step.py, the one
training path) with the same initial weights and its own data (``data_seed``), wrapped in
DDP or FSDP2's ``fully_shard`` (per block, then the root). Each rank warms up and times its
steps exactly as a single-process run does (engine/measure.py), then runs the instrumented
breakdown step, and writes a report; the worker combines the reports into one result:

- step time: the slowest rank's, step by step (the per-step maximum over ranks), then its
  median and spread, since an optimizer step is not over until every rank's is;
- samples/s: the effective batch (batch × accum × nproc, ``BenchConfig.effective_batch``)
  over that step time;
- memory: the peak and breakdown of the rank with the largest peak, and every rank's peak
  (``rank_peak_bytes``).

A rank that raises writes its status (``oom``/``error``) and message before it exits; the
launcher then stops every other rank and the earliest failure becomes the result. A hang
meets the worker's timeout: the caller kills the worker, and every rank, which asked the
kernel to kill it when its parent (the worker) dies, goes with it. No rank outlives the run.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import os
import signal
import sys
import tempfile
import threading
import time
import uuid
from typing import Callable

from . import devices
from .config import BenchConfig
from .progress import Progress, ProgressFn
from .results import MemoryBreakdown, Metrics, Result, classify_exception
from .stats import Summary

_CONFIG_FILE = "config.json"
_PROGRESS_FILE = "progress.txt"
_POLL_S = 0.2
_RUN_DIR_PREFIX = "tradeoff-lab-ranks-"  # + the worker's pid + a random part


def data_seed(seed: int, rank: int) -> int:
    """The seed of rank ``rank``'s synthetic batches: each rank trains on its own data."""
    return seed + rank


def _report_path(run_dir: str, rank: int, failed: bool = False) -> str:
    return os.path.join(run_dir, f"rank{rank}.{'failed' if failed else 'report'}.json")


def _write_json(path: str, data: dict) -> None:
    """Written whole or not at all: the reader never sees half a report."""
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(data, f)
    os.replace(path + ".tmp", path)


# ------------------------------------------------------------------------- in each rank
def wrap_for(config: BenchConfig, device, world_size: int) -> Callable:
    """The function that wraps a rank's model for ``config.parallel``: DDP (replicated
    parameters, gradients all-reduced in buckets during backward), or FSDP2's
    ``fully_shard`` on every block ``models.find_blocks`` finds (``config.blocks``) and then
    on the root, with ``reshard_after_forward=config.reshard``. Needs the process group."""
    from . import models

    def ddp(model):
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    def fsdp(model):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(device.type, (world_size,))
        blocks = models.find_blocks(model, config.blocks)
        # Per block, so only one block's parameters are gathered at a time; the root takes
        # what is left (embeddings, head).
        for block in blocks.modules if blocks is not None else ():
            fully_shard(block, mesh=mesh, reshard_after_forward=config.reshard)
        return fully_shard(model, mesh=mesh, reshard_after_forward=config.reshard)

    if config.parallel not in ("ddp", "fsdp"):
        raise ValueError(f"no data-parallel wrapper for parallel={config.parallel!r}")
    return ddp if config.parallel == "ddp" else fsdp


def build_rank_step(config: BenchConfig, rank: int, world_size: int, device):
    """Rank ``rank``'s TrainingStep: the model built with ``config.seed`` (the same initial
    weights on every rank), wrapped for ``config.parallel``, and batches made from
    ``data_seed(config.seed, rank)``. Needs the process group."""
    import torch

    from . import models
    from .step import TrainingStep

    torch.manual_seed(config.seed)
    with device:
        model, make_batch = models.build(config.model, config.overrides)
    # TrainingStep makes the batches after wrapping, which draws no random numbers.
    torch.manual_seed(data_seed(config.seed, rank))
    return TrainingStep(model, make_batch, config, device, wrap=wrap_for(config, device, world_size))


def resident_bytes(step) -> dict[str, int]:
    """What a rank keeps between steps: its parameters and its optimizer state, in bytes of
    its own storage (FSDP's shards: a DTensor counts its local part)."""
    import torch

    def local(tensor):
        return tensor.to_local() if hasattr(tensor, "to_local") else tensor

    params = sum(local(p).untyped_storage().nbytes() for p in step.model.parameters())
    state = sum(local(value).untyped_storage().nbytes() for per_param in step.optimizer.state.values()
                for value in per_param.values() if isinstance(value, torch.Tensor))
    return {"params": params, "optimizer": state}


def ddp_bucket_bytes(model) -> int:
    """Bytes of DDP's gradient buckets (flat all-reduce buffers it allocates when it wraps the
    model, a second copy of the gradients unless they are views into the buckets); 0 for
    anything but DDP. A tensor tracker started later never sees them."""
    if not hasattr(model, "_get_ddp_logging_data"):
        return 0
    data = model._get_ddp_logging_data()
    if data.get("gradient_as_bucket_view"):
        return 0
    return sum(int(size) for size in str(data.get("bucket_sizes", "")).split(",") if size.strip())


def _die_with_parent() -> None:
    """Have the kernel kill this rank when the worker that launched it dies (Linux), and
    leave at once if it already has: a timed-out run's ranks must not stay on the device."""
    parent = os.getppid()
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:
        os._exit(1)


def rank_device(config: BenchConfig, local_rank: int, world_size: int):
    """This rank's device, set up before anything touches it: on CUDA ``cuda:<local_rank>``
    of the worker's GPUs, made current and pinned as this process's own GPU (its NVML
    counters and its environment name it); on the CPU the ranks share the cores."""
    import torch

    resolved = devices.resolve_device(config.device)
    if resolved.startswith("cuda"):
        device = torch.device("cuda", local_rank)
        os.environ[devices.PINNED_ENV] = os.environ["CUDA_VISIBLE_DEVICES"].split(",")[local_rank]
        torch.cuda.set_device(device)
        return device
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(max(1, usable // world_size))
    return torch.device(resolved)


def _measure_rank(config: BenchConfig, rank: int, local_rank: int, world_size: int, run_dir: str) -> dict:
    """Warm up, time and instrument this rank's step as measure.run_benchmark does; the report."""
    import torch
    import torch.distributed as dist

    from . import counters, memory, models
    from .measure import _on_device, _skipped_steps, _time_steps, _warm_up, run_environment

    device = rank_device(config, local_rank, world_size)
    # The run's own timeout (the worker's) decides that a run hangs; a collective's timeout
    # beyond it only bounds a rank that somehow lost its worker.
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                            timeout=datetime.timedelta(seconds=2 * config.timeout_s + 60),
                            device_id=device if device.type == "cuda" else None)
    progress_file = open(os.path.join(run_dir, _PROGRESS_FILE), "a", encoding="utf-8") if rank == 0 else None

    def emit(event: Progress) -> None:
        if progress_file is not None:
            progress_file.write(f"{event.phase} {event.step} {event.total}\n")
            progress_file.flush()

    notes: list[str] = []
    try:
        with _on_device(device, config, notes):
            emit(Progress("build", 0, 1))
            step = build_rank_step(config, rank, world_size, device)
            emit(Progress("build", 1, 1))
            compiling_steps_s = _warm_up(step, config, emit)
            device_counters = counters.DeviceCounters(device)
            try:
                device_counters.start()
                samples, scales = _time_steps(step, config, emit)
                device_counters.stop()
            finally:
                device_counters.close()
            emit(Progress("breakdown", 0, 1))
            breakdown = memory.memory_breakdown(step)
            emit(Progress("breakdown", 1, 1))
            if device.type == "cpu":
                # On CUDA the allocator's peak already holds the buckets (in "other").
                breakdown = dataclasses.replace(breakdown, other=breakdown.other + ddp_bucket_bytes(step.model))
                counters.check_cpu_cap(config.memory_cap_gib, breakdown.total)
            module = getattr(step.model, "module", step.model)  # DDP holds the model as .module
            c = device_counters
            return {
                "rank": rank,
                "env": run_environment(config, str(device)),
                "samples": samples,
                "peak_allocated_bytes": c.peak_allocated_bytes if c.peak_allocated_bytes is not None else breakdown.total,
                "peak_reserved_bytes": c.peak_reserved_bytes,
                "nvml_used_bytes": c.nvml_used_bytes,
                "nvml_device_used_bytes": c.nvml_device_used_bytes,
                "allocator_retries": c.allocator_retries,
                "breakdown": breakdown.to_dict(),
                "resident": resident_bytes(step),
                "tokens_per_sample": models.tokens_per_sample(module),
                "loss_scale": scales[-1] if scales is not None else None,
                "skipped_steps": _skipped_steps(scales) if scales is not None else None,
                "checkpointed": step.checkpointed.to_dict() if step.checkpointed is not None else None,
                "compiling_steps_s": compiling_steps_s,
                "notes": notes + c.notes,
            }
    finally:
        if progress_file is not None:
            progress_file.close()
        dist.destroy_process_group()


def _rank_main(run_dir: str) -> None:
    """A rank process: measure, write the report (or the failure) into ``run_dir``."""
    _die_with_parent()
    # The worker decides when a run stops (as for its own Ctrl-C); rank output goes to stderr
    # so a caller's stdout carries only its own output.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    rank, local_rank, world_size = (int(os.environ[name]) for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    with open(os.path.join(run_dir, _CONFIG_FILE), encoding="utf-8") as f:
        config = BenchConfig.from_dict(json.load(f))
    try:
        report = _measure_rank(config, rank, local_rank, world_size, run_dir)
    except BaseException as exc:  # noqa: BLE001 - user code may raise anything, even SystemExit
        status, message = classify_exception(exc)
        _write_json(_report_path(run_dir, rank, failed=True),
                    {"rank": rank, "status": status, "message": message, "time": time.time()})
        sys.stderr.flush()
        os._exit(1)  # at once: the other ranks wait in a collective; the launcher stops them
    _write_json(_report_path(run_dir, rank), report)


# ------------------------------------------------------------------------- in the worker
def _forward_progress(path: str, emit: ProgressFn, done: threading.Event) -> None:
    """Forward rank 0's progress lines (``phase step total``) to ``emit`` until ``done``."""
    offset = 0
    while not done.wait(_POLL_S):
        try:
            with open(path, encoding="utf-8") as f:
                f.seek(offset)
                text = f.read()
        except FileNotFoundError:
            continue
        complete, _, _ = text.rpartition("\n")
        if not complete:
            continue
        offset += len(complete) + 1
        for line in complete.splitlines():
            phase, step, total = line.split()
            emit(Progress(phase, int(step), int(total)))


def _earliest_failure(run_dir: str, world_size: int) -> dict | None:
    """The first rank failure written (a rank's error breaks the others' collectives, which
    then fail too: the earliest is the cause), or None when no rank wrote one."""
    failures = []
    for rank in range(world_size):
        try:
            with open(_report_path(run_dir, rank, failed=True), encoding="utf-8") as f:
                failures.append(json.load(f))
        except (FileNotFoundError, ValueError):
            continue
    return min(failures, key=lambda failure: failure["time"]) if failures else None


def death_words(failures: dict) -> str:
    """How ranks died that wrote no failure of their own (the launcher's ``ProcessFailure``s
    by global rank): "rank 1 died: exit code 3", "rank 0 died: killed by signal SIGKILL"."""
    def how(failure) -> str:
        if failure.exitcode < 0:
            hint = " (on Linux often the kernel's out-of-memory killer)" if failure.exitcode == -signal.SIGKILL else ""
            return f"killed by signal {failure.signal_name()}{hint}"
        return f"exit code {failure.exitcode}"

    return "; ".join(f"rank {rank} died: {how(failure)}" for rank, failure in sorted(failures.items()))


def _local_env(config: BenchConfig) -> dict:
    """What the worker knows without touching a device (a CUDA context in the agent would sit
    on a GPU being measured)."""
    import platform

    import torch

    device = devices.resolve_device(config.device)
    return {"device_type": device.split(":")[0], "torch": torch.__version__, "python": platform.python_version(),
            "cpu": devices.cpu_model_name(), "host_id": devices.this_host_id()}


def _remove_stale_run_dirs() -> None:
    """Remove the run directories of workers that are gone: a worker killed for a timeout
    never removes its own."""
    import shutil

    parent = tempfile.gettempdir()
    for name in os.listdir(parent):
        if not name.startswith(_RUN_DIR_PREFIX):
            continue
        pid = name[len(_RUN_DIR_PREFIX):].split("-", 1)[0]
        if pid.isdigit() and not _running(int(pid)):
            shutil.rmtree(os.path.join(parent, name), ignore_errors=True)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def launch_ranks(config: BenchConfig, run_dir: str) -> None:
    """Start ``config.nproc`` rank processes on this host with torch.distributed's launcher
    and wait for them; raises ``ChildFailedError`` when one fails (after the launcher has
    stopped the others)."""
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    launch = LaunchConfig(
        min_nodes=1, max_nodes=1, nproc_per_node=config.nproc, run_id=uuid.uuid4().hex,
        # A rendezvous store on a free port of this host, as `torchrun --standalone` does.
        rdzv_backend="c10d", rdzv_endpoint="127.0.0.1:0",
        max_restarts=0, monitor_interval=0.1,
        logs_specs=DefaultLogsSpecs(log_dir=os.path.join(run_dir, "logs")),
        # While the ranks run, a SIGTERM to the worker stops them too. Not SIGINT: the worker
        # ignores Ctrl-C (its caller decides when a run stops, and kills it).
        signals_to_handle="SIGTERM",
    )
    previous = signal.getsignal(signal.SIGTERM)
    try:
        # `python -m` puts the working directory on the ranks' path, as on the worker's: a
        # user model the worker imports, the ranks import too.
        elastic_launch(launch, sys.executable)("-m", "engine.distributed", run_dir)
    finally:
        # The launcher's handler raises in whatever the warm worker does next.
        signal.signal(signal.SIGTERM, previous)


def benchmark(config: BenchConfig, progress: ProgressFn | None = None) -> Result:
    """Run ``config``'s ranks and combine their reports into one Result; a rank's failure is
    the result's status (``oom``/``error``). Runs in the worker process."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    emit = progress or (lambda event: None)
    _remove_stale_run_dirs()
    with tempfile.TemporaryDirectory(prefix=f"{_RUN_DIR_PREFIX}{os.getpid()}-") as run_dir:
        _write_json(os.path.join(run_dir, _CONFIG_FILE), config.to_dict())
        done = threading.Event()
        forwarder = threading.Thread(target=_forward_progress, daemon=True,
                                     args=(os.path.join(run_dir, _PROGRESS_FILE), emit, done))
        forwarder.start()
        try:
            launch_ranks(config, run_dir)
        except ChildFailedError as exc:
            failure = _earliest_failure(run_dir, config.nproc)
            if failure is None:  # killed or crashed before it could say why
                status, message = "error", death_words(exc.failures)
            else:
                status, message = failure["status"], f"rank {failure['rank']}: {failure['message']}"
            return Result.new(config, status, _local_env(config), error=message[:4000])
        finally:
            done.set()
            forwarder.join()
        reports = []
        for rank in range(config.nproc):
            with open(_report_path(run_dir, rank), encoding="utf-8") as f:
                reports.append(json.load(f))
    return combine(config, reports)


def combine(config: BenchConfig, reports: list[dict]) -> Result:
    """One Result from every rank's report (see the module docstring for the rules)."""
    from .measure import _warnings, compile_time
    from .results import Checkpointed

    keys = list(reports[0]["samples"])
    # Step i is over when the slowest rank's step i is: the per-step maximum over ranks.
    samples = {key: [max(values) for values in zip(*(r["samples"][key] for r in reports))] for key in keys}
    summaries = {key: Summary.from_samples(values) for key, values in samples.items()}
    peaks = [int(r["peak_allocated_bytes"]) for r in reports]
    top = reports[peaks.index(max(peaks))]
    step_s = summaries["step_ms"].median / 1000.0
    samples_per_s = config.effective_batch / step_s if step_s > 0 else None
    tokens = reports[0]["tokens_per_sample"]
    env = dict(reports[0]["env"])
    if env.get("gpu_uuid"):
        env["gpu_uuid"] = ",".join(r["env"]["gpu_uuid"] for r in reports)
    skipped = top["skipped_steps"]
    compile_s, compile_notes = (None, []) if config.compile == "none" else compile_time(
        {f"rank {r['rank']}'s ": r.get("compiling_steps_s") for r in reports}, step_s)
    metrics = Metrics(
        effective_batch=config.effective_batch,
        **summaries,
        samples_per_s=samples_per_s,
        tokens_per_s=samples_per_s * tokens if tokens and samples_per_s else None,
        peak_allocated_bytes=top["peak_allocated_bytes"],
        peak_reserved_bytes=top["peak_reserved_bytes"],
        nvml_used_bytes=top["nvml_used_bytes"],
        nvml_device_used_bytes=top["nvml_device_used_bytes"],
        memory_breakdown_bytes=MemoryBreakdown(**top["breakdown"]),
        loss_scale=top["loss_scale"],
        skipped_steps=skipped,
        allocator_retries=top["allocator_retries"],
        rank_peak_bytes=peaks,
        compile_s=compile_s,
    )
    resident = top["resident"]
    warnings = _warnings(summaries, config.steps, skipped, top["allocator_retries"]) + list(top["notes"]) + compile_notes
    warnings.append(
        f"{config.nproc} ranks ({config.parallel.upper()}): step times are the slowest rank's per step; memory is "
        f"rank {top['rank']}'s (the largest peak), which keeps {resident['params']:,} bytes of parameters and "
        f"{resident['optimizer']:,} bytes of optimizer state between steps; FLOPs, MFU, energy and the numerical "
        "cost are not measured for data-parallel runs")
    checkpointed = Checkpointed.from_dict(top["checkpointed"]) if top["checkpointed"] is not None else None
    return Result.new(config, "ok", env, metrics=metrics, samples=samples, warnings=warnings, checkpointed=checkpointed)


if __name__ == "__main__":
    _rank_main(sys.argv[1])
