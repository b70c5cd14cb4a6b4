"""The environment a result was measured in (the result's ``env`` object)."""
from __future__ import annotations

import platform

import torch

from .config import device_capacity_bytes


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


def nvml_driver_version() -> str | None:
    """The NVIDIA driver version via NVML (nvidia-ml-py), or None without driver/library."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # no library, no driver, no GPU: all mean "unknown"
        return None
    try:
        version = pynvml.nvmlSystemGetDriverVersion()
        return version.decode() if isinstance(version, bytes) else str(version)
    except Exception:
        return None
    finally:
        pynvml.nvmlShutdown()


def env_info(device: str) -> dict:
    """``{device_type, device_name, capacity_bytes, torch, cuda, driver, python, cpu}`` for a
    resolved device string (``cpu``, ``cuda``, ``cuda:1``, ``mps``)."""
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
        "driver": nvml_driver_version() if dev.type == "cuda" else None,
        "python": platform.python_version(),
        "cpu": cpu,
    }
