"""The one module that talks to NVML (nvidia-ml-py): GPU listing, driver version, and one
GPU's memory and energy counters during a run.

NVML reads the driver's view without creating a CUDA context, so listing GPUs never takes
memory on the devices being benchmarked. NVML is optional: without the library, a driver
or a GPU every figure here is None (unknown), never an error.
"""
from __future__ import annotations

import contextlib
from typing import Iterator


class NvmlUnavailable(RuntimeError):
    """NVML cannot be used here; the message says why (no library, no driver)."""


@contextlib.contextmanager
def session() -> Iterator[object]:
    """An initialised ``pynvml`` module for the ``with`` body; raises NvmlUnavailable."""
    try:
        import pynvml
    except ImportError:
        raise NvmlUnavailable("nvidia-ml-py is not installed, so NVIDIA GPUs cannot be listed (pip install nvidia-ml-py)") from None
    try:
        pynvml.nvmlInit()
    except Exception as exc:  # pynvml.NVMLError and its many driver/library subclasses
        raise NvmlUnavailable(f"No NVIDIA driver found (NVML: {exc})") from None
    try:
        yield pynvml
    finally:
        with contextlib.suppress(Exception):
            pynvml.nvmlShutdown()


def query(call, *args):
    """One NVML query, None where the GPU or driver does not support it."""
    try:
        return call(*args)
    except Exception:  # NVMLError_NotSupported and friends: the field is unknown, not fatal
        return None


def text(value) -> str | None:
    """NVML strings are bytes in older nvidia-ml-py releases."""
    return value.decode() if isinstance(value, bytes) else value


def unavailable_reason() -> str | None:
    """Why no GPU is listed (no nvidia-ml-py, no driver, no GPU), or None when GPUs are present."""
    try:
        with session() as nvml:
            if nvml.nvmlDeviceGetCount() == 0:
                return "The NVIDIA driver is loaded but reports no GPU"
    except NvmlUnavailable as exc:
        return str(exc)
    return None


def driver_version() -> str | None:
    """The NVIDIA driver version, or None without driver/library."""
    try:
        with session() as nvml:
            return text(query(nvml.nvmlSystemGetDriverVersion))
    except NvmlUnavailable:
        return None


def _describe(nvml, handle, index, driver: str | None, cuda: str | None) -> dict:
    memory = query(nvml.nvmlDeviceGetMemoryInfo, handle)
    utilization = query(nvml.nvmlDeviceGetUtilizationRates, handle)
    power_mw = query(nvml.nvmlDeviceGetPowerUsage, handle)
    return {
        "index": index,
        "name": text(query(nvml.nvmlDeviceGetName, handle)),
        "uuid": text(query(nvml.nvmlDeviceGetUUID, handle)),
        "memory_used_bytes": memory.used if memory else None,
        "memory_total_bytes": memory.total if memory else None,
        "utilization_pct": utilization.gpu if utilization else None,
        "temperature_c": query(nvml.nvmlDeviceGetTemperature, handle, nvml.NVML_TEMPERATURE_GPU),
        "power_w": power_mw / 1000 if power_mw is not None else None,
        "driver": driver,
        "cuda": cuda,
    }


def _mig_instances(nvml, handle) -> list:
    """The MIG instances of a GPU in MIG mode (each a CUDA device of its own), else []."""
    mode = query(nvml.nvmlDeviceGetMigMode, handle)
    if not mode or mode[0] != getattr(nvml, "NVML_DEVICE_MIG_ENABLE", 1):
        return []
    found = []
    for i in range(query(nvml.nvmlDeviceGetMaxMigDeviceCount, handle) or 0):
        mig = query(nvml.nvmlDeviceGetMigDeviceHandleByIndex, handle, i)
        if mig is not None:
            found.append(mig)
    return found


def list_gpus() -> list[dict]:
    """NVIDIA GPUs (and, after a GPU in MIG mode, each of its MIG instances, index "i:j")
    with index (NVML's), name, uuid, memory used/total (bytes), utilisation (%), temperature
    (C), power (W), driver and CUDA driver version; [] without NVML or GPU."""
    try:
        with session() as nvml:
            driver = text(query(nvml.nvmlSystemGetDriverVersion))
            cuda_int = query(nvml.nvmlSystemGetCudaDriverVersion)  # e.g. 12040 for 12.4
            cuda = f"{cuda_int // 1000}.{cuda_int % 1000 // 10}" if cuda_int else None
            gpus = []
            for index in range(nvml.nvmlDeviceGetCount()):
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                gpus.append(_describe(nvml, handle, index, driver, cuda))
                for j, mig in enumerate(_mig_instances(nvml, handle)):
                    gpus.append(_describe(nvml, mig, f"{index}:{j}", driver, cuda))
            return gpus
    except NvmlUnavailable:
        return []


class GpuCounters:
    """NVML's view of one GPU (or MIG instance) during a run: memory in use by the device and
    by each compute process, and the energy counter.

    ``uuid`` is the device's NVML UUID ("GPU-..." or "MIG-..."): the one name CUDA and NVML
    share whatever CUDA_VISIBLE_DEVICES says. Every reading is None when NVML, the device or
    the counter is unavailable.
    """

    def __init__(self, uuid: str):
        self.handle = None
        self._stack = contextlib.ExitStack()
        try:
            self._nvml = self._stack.enter_context(session())
        except NvmlUnavailable:
            return
        self.handle = query(self._nvml.nvmlDeviceGetHandleByUUID, uuid)

    def used_bytes(self) -> int | None:
        """Device memory in use by all processes (includes CUDA contexts), or None."""
        if self.handle is None:
            return None
        info = query(self._nvml.nvmlDeviceGetMemoryInfo, self.handle)
        return int(info.used) if info is not None else None

    def processes(self) -> dict[int, int | None] | None:
        """Compute processes on the device: pid -> GPU memory it uses (None where NVML cannot
        say), or None when NVML cannot list them. Pids are as NVML sees them: in a container
        with its own pid namespace they are the host's, not this process's."""
        if self.handle is None:
            return None
        listed = query(self._nvml.nvmlDeviceGetComputeRunningProcesses, self.handle)
        if listed is None:
            return None
        return {int(p.pid): (None if p.usedGpuMemory is None else int(p.usedGpuMemory)) for p in listed}

    def energy_mj(self) -> int | None:
        """Total energy the GPU used since the driver loaded, in mJ (Volta+), or None."""
        if self.handle is None:
            return None
        value = query(self._nvml.nvmlDeviceGetTotalEnergyConsumption, self.handle)
        return int(value) if value is not None else None

    def close(self) -> None:
        """Release NVML (idempotent)."""
        self.handle = None
        self._stack.close()
