"""What hardware is here: which device a run uses, which physical GPU that is, how much memory
it has, the CPU's name, and the environment a result records.

A process that starts benchmarks (the CLI, the dashboard) never initialises CUDA: a CUDA
context there would sit on the GPU being measured, outside the device queue. It learns
torch's CUDA devices (``cuda:N`` with their UUIDs, names and memory) once, from a short-lived
probe subprocess. Each worker process then sees exactly one GPU
(``CUDA_VISIBLE_DEVICES=<its UUID>``, set before CUDA initialises), so inside a worker the
target is always ``cuda:0``, and workers and the device queue are keyed by the GPU's UUID:
``auto``, ``cuda`` and ``cuda:0`` name one GPU, one worker and one queue.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import os
import platform
import socket
import subprocess
import sys
from dataclasses import dataclass

from . import nvml

# Set in a worker process that was started for one GPU: every CUDA device name means it.
PINNED_ENV = "TRADEOFF_LAB_PINNED_GPU"

_PROBE = """
import json, torch
gpus = []
if torch.cuda.is_available():
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        uuid = str(getattr(p, "uuid", "") or "")
        gpus.append({"index": i, "uuid": uuid or None, "name": p.name, "total_memory": int(p.total_memory),
                     "capability": [p.major, p.minor]})
print(json.dumps(gpus))
"""
PROBE_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class CudaGpu:
    """One CUDA device as torch numbers it in this process (``cuda:{index}``)."""

    index: int
    uuid: str | None  # "GPU-..." or "MIG-..."; None where CUDA reports none
    name: str
    total_memory: int
    # (major, minor) compute capability: which attention kernels it runs; None if unknown.
    capability: tuple[int, int] | None = None

    @property
    def key(self) -> str:
        """What names this physical GPU (its UUID) for workers, queues and NVML."""
        return self.uuid or f"cuda-index-{self.index}"


def _cuda_wheel_expected() -> bool:
    """False for torch builds that cannot have CUDA (the CPU wheels, ``+cpu``): no probe needed."""
    try:
        return not importlib.metadata.version("torch").endswith("+cpu")
    except importlib.metadata.PackageNotFoundError:
        return False


def normalised_uuid(uuid: str | None, name: str = "") -> str | None:
    """A UUID as NVML and CUDA_VISIBLE_DEVICES write it: torch prints it without the prefix,
    which is "MIG-" for a MIG instance (its name says "MIG") and "GPU-" otherwise."""
    if not uuid:
        return None
    if uuid.startswith(("GPU-", "MIG-")):
        return uuid
    return f"{'MIG' if ' MIG ' in f' {name} ' else 'GPU'}-{uuid}"


@functools.cache
def cuda_gpus() -> tuple[CudaGpu, ...]:
    """torch's CUDA devices in this process's order (honouring CUDA_VISIBLE_DEVICES), learned
    once from a probe subprocess so this process never initialises CUDA; () without CUDA."""
    if PINNED_ENV in os.environ or not _cuda_wheel_expected():
        return ()
    try:
        out = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=PROBE_TIMEOUT_S,
                             check=True).stdout
        found = json.loads(out.strip().splitlines()[-1])
    except (subprocess.SubprocessError, OSError, ValueError, IndexError):
        return ()
    return tuple(CudaGpu(g["index"], normalised_uuid(g["uuid"], g["name"]), g["name"], g["total_memory"],
                         tuple(g["capability"]) if g.get("capability") else None) for g in found)


def cuda_device_count() -> int:
    """CUDA GPUs torch can use here (0 without CUDA). Inside a worker: its one GPU."""
    if PINNED_ENV in os.environ:
        return 1
    return len(cuda_gpus())


def mps_available() -> bool:
    """Whether Apple's MPS backend can be used."""
    if sys.platform != "darwin":
        return False
    import torch

    backend = getattr(torch.backends, "mps", None)
    return bool(backend and backend.is_available())


def resolve_device(device: str) -> str:
    """Turn ``auto`` into the best present device; inside a worker started for one GPU, every
    CUDA device is its ``cuda:0``; other values pass through."""
    if PINNED_ENV in os.environ and (device == "auto" or device.startswith("cuda")):
        return "cuda:0"
    if device != "auto":
        return device
    if cuda_device_count() > 0:
        return "cuda"
    return "mps" if mps_available() else "cpu"


def cuda_gpu(device: str) -> CudaGpu:
    """The CudaGpu a resolved ``cuda``/``cuda:N`` names in this process; IndexError if absent."""
    index = int(device.split(":")[1]) if ":" in device else 0
    return cuda_gpus()[index]


def cuda_gpu_or_none(device: str) -> CudaGpu | None:
    """The CudaGpu of a resolved CUDA device as the probe saw it; None for other devices, or
    inside a worker (which never probes)."""
    if not device.startswith("cuda") or PINNED_ENV in os.environ:
        return None
    try:
        return cuda_gpu(device)
    except IndexError:
        return None


def device_key(device: str) -> str:
    """What identifies the physical device behind ``device``: its GPU UUID for CUDA (so
    ``auto``, ``cuda`` and ``cuda:0`` are one key), else the device type ("cpu", "mps")."""
    return device_keys(device)[0]


def _run_gpus(device: str, count: int) -> tuple[CudaGpu, ...]:
    """The ``count`` CUDA GPUs a run on resolved ``device`` uses: that GPU and the next ones
    (a data-parallel run has one GPU per rank). IndexError if there are not that many."""
    first = int(device.split(":")[1]) if ":" in device else 0
    gpus = cuda_gpus()[first:first + count]
    if len(gpus) < count:
        raise IndexError(f"{count} GPUs from cuda:{first} on: only {len(gpus)} are visible")
    return gpus


def device_keys(device: str, count: int = 1) -> tuple[str, ...]:
    """The keys (``device_key``) of every device a run of ``count`` ranks on ``device`` holds:
    on CUDA one GPU per rank, from ``device`` on; elsewhere the one device every rank shares."""
    resolved = resolve_device(device)
    if not resolved.startswith("cuda"):
        return (resolved,)
    if PINNED_ENV in os.environ:
        return (os.environ[PINNED_ENV],)
    return tuple(gpu.key for gpu in _run_gpus(resolved, count))


def visible_devices_for(device: str, count: int = 1) -> str | None:
    """The CUDA_VISIBLE_DEVICES value that makes ``device`` (and, for ``count`` ranks, the
    next GPUs) a worker's only GPUs: their UUIDs, else their entries in this process's
    CUDA_VISIBLE_DEVICES, comma-separated; None for cpu and mps."""
    resolved = resolve_device(device)
    if not resolved.startswith("cuda"):
        return None
    inherited = os.environ.get("CUDA_VISIBLE_DEVICES")

    def visible(gpu: CudaGpu) -> str:
        if gpu.uuid:
            return gpu.uuid
        return inherited.split(",")[gpu.index].strip() if inherited else str(gpu.index)

    return ",".join(visible(gpu) for gpu in _run_gpus(resolved, count))


def device_capacity_bytes(device: str) -> int | None:
    """Total memory of a resolved device: GPU memory, or physical RAM for CPU; None if unknown."""
    if device.startswith("cuda"):
        if PINNED_ENV in os.environ:
            import torch

            # A rank of a data-parallel run sees all of its run's GPUs and uses cuda:<rank>.
            return int(torch.cuda.get_device_properties(torch.device(device).index or 0).total_memory)
        return cuda_gpu(device).total_memory
    if device == "cpu":
        try:
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError):
            return None
    return None


def gpus() -> list[dict]:
    """Every NVIDIA GPU NVML sees (``nvml.list_gpus``) with ``cuda_index``: its ``cuda:N`` in
    this process, matched by UUID (NVML indices need not match torch's), None when CUDA
    does not see it (hidden by CUDA_VISIBLE_DEVICES)."""
    by_uuid = {gpu.uuid: gpu.index for gpu in cuda_gpus() if gpu.uuid}
    return [gpu | {"cuda_index": by_uuid.get(gpu["uuid"])} for gpu in nvml.list_gpus()]


def gpu_label(gpu: dict) -> str:
    """How a GPU of ``gpus()`` is numbered: "NVML 1 = cuda:0" (the two need not agree)."""
    cuda = f"cuda:{gpu['cuda_index']}" if gpu.get("cuda_index") is not None else "not visible to CUDA here"
    return f"NVML {gpu['index']} = {cuda}"


def cpu_model_name() -> str:
    """The CPU's marketing name (``/proc/cpuinfo`` on Linux), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith(("model name", "hardware", "cpu model")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass  # not Linux: fall back to platform
    return platform.processor() or platform.machine() or "unknown"


def available_ram_bytes() -> int | None:
    """Memory available to new work now (``MemAvailable`` of /proc/meminfo); None elsewhere."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def cpu_facts() -> dict:
    """What decides whether CPU timings mean anything: the CPU's name, its logical cores, the
    cores this process may use, the threads torch computes with, total and available RAM and
    the load average over the last minute (None where the OS does not say)."""
    import torch

    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu": cpu_model_name(),
        "logical_cores": os.cpu_count(),
        "usable_cores": usable,
        "torch_threads": torch.get_num_threads(),
        "ram_bytes": device_capacity_bytes("cpu"),
        "available_bytes": available_ram_bytes(),
        "load_avg": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }


# Both names configure the CUDA caching allocator (the second is the older, still read).
ALLOC_CONF_VARIABLES = ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")


def set_alloc_conf(alloc_conf: str) -> None:
    """Configure this (worker) process's CUDA caching allocator, before CUDA initialises:
    PYTORCH_CUDA_ALLOC_CONF, which every torch reads (torch 2.13 reads it first, and
    PYTORCH_ALLOC_CONF only without it); an inherited PYTORCH_ALLOC_CONF goes, so the process
    holds exactly the config's settings and the fingerprint records them."""
    os.environ.pop("PYTORCH_ALLOC_CONF", None)
    os.environ["PYTORCH_CUDA_ALLOC_CONF"] = alloc_conf


def allocator_settings() -> str | None:
    """The caching allocator's settings from the environment (``NAME=value``; None when unset):
    expandable segments or a different split size change peak memory and speed."""
    return "; ".join(f"{name}={os.environ[name]}" for name in ALLOC_CONF_VARIABLES if os.environ.get(name)) or None


@functools.cache
def this_host_id() -> str:
    """This machine, as results record it: a hash of its machine id (else its host name), so
    bundles shared with teammates never carry the id itself."""
    try:
        with open("/etc/machine-id", encoding="ascii") as f:
            raw = f.read().strip()
    except OSError:
        raw = ""
    return hashlib.sha1((raw or socket.gethostname()).encode()).hexdigest()[:12]


def env_info(device: str) -> dict:
    """The result's ``env`` for a resolved device string (``cpu``, ``cuda``, ``cuda:1``,
    ``mps``): device type, name and capacity, torch/CUDA/driver/Python versions, the CPU,
    and the fingerprint (host, GPU UUID, CPU threads, allocator settings) plus the load when
    the run starts. Runs in the worker, which owns the device."""
    import torch

    dev = torch.device(device)
    cpu = cpu_model_name()
    if dev.type == "cuda":
        name = torch.cuda.get_device_name(dev)
    elif dev.type == "mps":
        name = f"Apple MPS ({cpu})"
    else:
        name = cpu
    return {
        "device_type": dev.type,
        "device_name": name,
        "capacity_bytes": device_capacity_bytes(device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "driver": nvml.driver_version() if dev.type == "cuda" else None,
        "python": platform.python_version(),
        "cpu": cpu,
        "host_id": this_host_id(),
        "gpu_uuid": device_key(device) if dev.type == "cuda" else None,
        "cpu_threads": torch.get_num_threads(),
        "alloc_conf": allocator_settings() if dev.type == "cuda" else None,
        "load_avg": os.getloadavg()[0] if dev.type == "cpu" and hasattr(os, "getloadavg") else None,
    }


def pin_this_process(visible: str) -> None:
    """Make this (worker) process see exactly its GPUs (one, or a data-parallel run's, comma-
    separated), before CUDA initialises: every CUDA device then resolves to its ``cuda:0``
    (a rank of a data-parallel run uses ``cuda:<rank>`` explicitly)."""
    os.environ["CUDA_VISIBLE_DEVICES"] = visible
    os.environ[PINNED_ENV] = visible
