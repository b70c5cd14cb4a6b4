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


def list_gpus() -> list[dict]:
    """NVIDIA GPUs with index, name, uuid, memory used/total (bytes), utilisation (%),
    temperature (C), power (W), driver and CUDA driver version; [] without NVML or GPU."""
    try:
        with session() as nvml:
            driver = text(query(nvml.nvmlSystemGetDriverVersion))
            cuda_int = query(nvml.nvmlSystemGetCudaDriverVersion)  # e.g. 12040 for 12.4
            cuda = f"{cuda_int // 1000}.{cuda_int % 1000 // 10}" if cuda_int else None
            gpus = []
            for index in range(nvml.nvmlDeviceGetCount()):
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                memory = query(nvml.nvmlDeviceGetMemoryInfo, handle)
                utilization = query(nvml.nvmlDeviceGetUtilizationRates, handle)
                power_mw = query(nvml.nvmlDeviceGetPowerUsage, handle)
                gpus.append({
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
                })
            return gpus
    except NvmlUnavailable:
        return []


class GpuCounters:
    """NVML's view of one GPU during a run: memory in use and the energy counter.

    ``uuid`` is the GPU's UUID as CUDA reports it (``torch.cuda.get_device_properties().uuid``,
    with or without the ``GPU-`` prefix); ``fallback_index`` the NVML index to use when the
    UUID lookup fails. Every reading is None when NVML or the counter is unavailable.
    """

    def __init__(self, uuid: str, fallback_index: int | None = None):
        self.handle = None
        self._stack = contextlib.ExitStack()
        try:
            self._nvml = self._stack.enter_context(session())
        except NvmlUnavailable:
            return
        try:
            name = uuid if uuid.startswith(("GPU-", "MIG-")) else f"GPU-{uuid}"
            self.handle = self._nvml.nvmlDeviceGetHandleByUUID(name)
        except Exception:
            if fallback_index is not None:
                self.handle = query(self._nvml.nvmlDeviceGetHandleByIndex, fallback_index)

    def used_bytes(self) -> int | None:
        """Device memory in use by all processes (includes CUDA contexts), or None."""
        if self.handle is None:
            return None
        info = query(self._nvml.nvmlDeviceGetMemoryInfo, self.handle)
        return int(info.used) if info is not None else None

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
