"""What hardware is here: NVIDIA GPUs through NVML (nvidia-ml-py), the CPU model, the default device.

NVML reads the driver's view without creating a CUDA context, so listing GPUs never takes
memory on the devices being benchmarked.
"""
from __future__ import annotations

import contextlib

from .config import resolve_device
from .envinfo import cpu_model_name


def _nvml():
    """The initialised pynvml module; raises ImportError or pynvml.NVMLError."""
    import pynvml

    pynvml.nvmlInit()
    return pynvml


def nvml_message() -> str | None:
    """Why no GPU is listed (no nvidia-ml-py, no driver, no GPU), or None when GPUs are present."""
    try:
        nvml = _nvml()
    except ImportError:
        return "nvidia-ml-py is not installed, so NVIDIA GPUs cannot be listed (pip install nvidia-ml-py)"
    except Exception as exc:  # pynvml.NVMLError and its many driver/library subclasses
        return f"No NVIDIA driver found (NVML: {exc})"
    try:
        if nvml.nvmlDeviceGetCount() == 0:
            return "The NVIDIA driver is loaded but reports no GPU"
    finally:
        nvml.nvmlShutdown()
    return None


def _query(call, *args):
    """One NVML query, None where the GPU or driver does not support it."""
    try:
        return call(*args)
    except Exception:  # NVMLError_NotSupported and friends: the field is unknown, not fatal
        return None


def _text(value) -> str | None:
    return value.decode() if isinstance(value, bytes) else value


def list_gpus() -> list[dict]:
    """NVIDIA GPUs with name, memory used/total (bytes), utilisation (%), temperature (C),
    power (W), driver and CUDA driver version; [] without nvidia-ml-py, driver or GPU."""
    try:
        nvml = _nvml()
    except Exception:  # ImportError or NVMLError: nvml_message() says which
        return []
    try:
        driver = _text(_query(nvml.nvmlSystemGetDriverVersion))
        cuda_int = _query(nvml.nvmlSystemGetCudaDriverVersion)  # e.g. 12040 for 12.4
        cuda = f"{cuda_int // 1000}.{cuda_int % 1000 // 10}" if cuda_int else None
        gpus = []
        for index in range(nvml.nvmlDeviceGetCount()):
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            memory = _query(nvml.nvmlDeviceGetMemoryInfo, handle)
            utilization = _query(nvml.nvmlDeviceGetUtilizationRates, handle)
            temperature = _query(nvml.nvmlDeviceGetTemperature, handle, nvml.NVML_TEMPERATURE_GPU)
            power_mw = _query(nvml.nvmlDeviceGetPowerUsage, handle)
            gpus.append({
                "index": index,
                "name": _text(_query(nvml.nvmlDeviceGetName, handle)),
                "memory_used_bytes": memory.used if memory else None,
                "memory_total_bytes": memory.total if memory else None,
                "utilization_pct": utilization.gpu if utilization else None,
                "temperature_c": temperature,
                "power_w": power_mw / 1000 if power_mw is not None else None,
                "driver": driver,
                "cuda": cuda,
            })
        return gpus
    finally:
        with contextlib.suppress(Exception):
            nvml.nvmlShutdown()


def default_device() -> str:
    """The device ``--device auto`` resolves to here: cuda, mps or cpu."""
    return resolve_device("auto")


def cpu_name() -> str:
    """The CPU model name, as results record it in ``env.cpu``."""
    return cpu_model_name()
