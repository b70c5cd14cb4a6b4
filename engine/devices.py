"""What hardware is here: which device a run uses, how much memory it has, the CPU's name,
and the environment a result records. torch is imported only when a GPU must be asked.
"""
from __future__ import annotations

import os
import platform

from . import nvml


def cuda_device_count() -> int:
    """CUDA GPUs torch can use (0 without CUDA)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def mps_available() -> bool:
    """Whether Apple's MPS backend can be used."""
    import torch

    backend = getattr(torch.backends, "mps", None)
    return bool(backend and backend.is_available())


def resolve_device(device: str) -> str:
    """Turn ``auto`` into the best present device; other values pass through."""
    if device != "auto":
        return device
    if cuda_device_count() > 0:
        return "cuda"
    return "mps" if mps_available() else "cpu"


def device_capacity_bytes(device: str) -> int | None:
    """Total memory of a resolved device: GPU memory, or physical RAM for CPU; None if unknown."""
    if device.startswith("cuda"):
        import torch

        index = int(device.split(":")[1]) if ":" in device else 0
        return int(torch.cuda.get_device_properties(index).total_memory)
    if device == "cpu":
        try:
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError):
            return None
    return None


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


def env_info(device: str) -> dict:
    """``{device_type, device_name, capacity_bytes, torch, cuda, driver, python, cpu}`` for a
    resolved device string (``cpu``, ``cuda``, ``cuda:1``, ``mps``): the result's ``env``."""
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
    }
