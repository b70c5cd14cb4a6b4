"""What the device itself counts around the timed steps, and the memory cap.

``DeviceCounters`` reads, on CUDA: the caching allocator's peak allocated and reserved bytes
(peaks reset when timing starts), its cache-flush-and-retry count, NVML's memory of this
process and of the whole device (NVML also counts the CUDA context, which the allocator
never sees), the other compute processes on the GPU (their work disturbs the timings), and
NVML's whole-GPU energy counter over a window of at least ``ENERGY_WINDOW_S``. On other
devices every reading stays None: a CPU run's peak comes from the instrumented step.

``memory_cap`` makes a cap mean the same on every device: on CUDA, total device use by the
run (CUDA context and driver included) stays under the cap; on the CPU the cap is judged on
the tracked tensor peak, the figure ``peak_allocated_bytes`` reports there.
"""
from __future__ import annotations

import contextlib
import os
import time
from typing import Callable, Iterator

import torch

from . import devices, nvml
from .config import GIB

# NVML's energy counter updates about every 100 ms: a window of 2 s keeps its resolution
# under 5 % of the reading.
ENERGY_WINDOW_S = 2.0


class DeviceCounters:
    """The device's own counters over the timed steps (CUDA; None elsewhere).

    Use: ``start()`` just before the first timed step, ``stop()`` just after the last,
    ``measure_energy(...)`` to complete the energy window with untimed steps, ``close()``.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.peak_allocated_bytes: int | None = None
        self.peak_reserved_bytes: int | None = None
        self.allocator_retries: int | None = None
        self.nvml_used_bytes: int | None = None  # this process
        self.nvml_device_used_bytes: int | None = None  # every process on the device
        self.other_processes: list[int] = []  # pids of other compute processes seen on the GPU
        self.energy_j_per_sample: float | None = None
        self.notes: list[str] = []
        self._gpu = nvml.GpuCounters(devices.device_key(str(device))) if device.type == "cuda" else None

    def start(self) -> None:
        """Reset the peaks and read the counters' starting values (after a synchronisation)."""
        if self._gpu is None:
            return
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        self._retries_before = torch.cuda.memory_stats(self.device).get("num_alloc_retries", 0)
        self._processes_before = self._gpu.processes() or {}
        self._energy_before = self._gpu.energy_mj()
        self._started = time.perf_counter()

    def stop(self) -> None:
        """Read the allocator and NVML figures of the timed steps (after a synchronisation)."""
        if self._gpu is None:
            return
        torch.cuda.synchronize(self.device)
        stats = torch.cuda.memory_stats(self.device)
        self.peak_allocated_bytes = int(stats["allocated_bytes.all.peak"])
        self.peak_reserved_bytes = int(stats["reserved_bytes.all.peak"])
        self.allocator_retries = int(stats.get("num_alloc_retries", 0) - self._retries_before)
        # Sampled while the timed steps' memory is still cached.
        self.nvml_device_used_bytes = self._gpu.used_bytes()
        processes = self._gpu.processes()
        if processes is None:
            return
        mine = os.getpid()
        self.nvml_used_bytes = processes.get(mine)
        seen = {**self._processes_before, **processes}
        if mine in seen:
            self.other_processes = sorted(pid for pid in seen if pid != mine)
        elif len(seen) > 1:
            # NVML lists host pids when this process runs in a pid namespace (a container):
            # it cannot say which one is this process, but more than one is someone else.
            self.other_processes = sorted(seen)
            self.notes.append("NVML lists this process under another pid (a container's pid namespace), so its own "
                              "memory is unknown; nvml_device_used_bytes is the whole device")
        if self.other_processes:
            self.notes.append(f"another compute process used this GPU during the run (pids {', '.join(map(str, self.other_processes))}): "
                              "its work competes for the GPU, so these timings are disturbed")

    def measure_energy(self, run_step: Callable[[], None], samples_per_step: int, steps_done: int,
                       deadline_s: float) -> None:
        """Energy per sample over the timed steps, extended with untimed ``run_step()`` calls
        until the window lasts ``ENERGY_WINDOW_S`` (no step starts after ``deadline_s``, a
        ``time.perf_counter`` value). The figure is the whole GPU's energy, other processes
        included; it stays None, with the reason in ``notes``, when it cannot be trusted."""
        if self._gpu is None:
            return
        if self._energy_before is None:
            self.notes.append("energy_j_per_sample: NVML reports no total-energy counter for this GPU")
            return
        steps = steps_done
        while time.perf_counter() - self._started < ENERGY_WINDOW_S and time.perf_counter() < deadline_s:
            run_step()
            torch.cuda.synchronize(self.device)
            steps += 1
        window = time.perf_counter() - self._started
        energy_after = self._gpu.energy_mj()
        if window < ENERGY_WINDOW_S:
            self.notes.append(f"energy_j_per_sample: not measured, the run's time limit left a {window:.2f} s window, "
                              f"shorter than the {ENERGY_WINDOW_S:g} s NVML's counter needs")
        elif energy_after is None or energy_after <= self._energy_before:
            self.notes.append("energy_j_per_sample: not measured, NVML's energy counter did not advance")
        else:
            # mJ -> J, over every step of the window (timed and untimed alike).
            self.energy_j_per_sample = (energy_after - self._energy_before) / 1000.0 / (steps * samples_per_step)
            self.notes.append(f"energy_j_per_sample is the whole GPU's energy over {window:.1f} s ({steps} steps)")

    def close(self) -> None:
        """Release NVML."""
        if self._gpu is not None:
            self._gpu.close()


def context_overhead_bytes(device: torch.device) -> int:
    """Device memory this process holds outside the caching allocator (CUDA context, driver,
    kernel images), measured now: NVML's figure for this process, else the device's used
    memory (which would also count other processes) less what the allocator reserved."""
    reserved = torch.cuda.memory_reserved(device)
    gpu = nvml.GpuCounters(devices.device_key(str(device)))
    try:
        used = (gpu.processes() or {}).get(os.getpid())
    finally:
        gpu.close()
    if used is None:
        free, total = torch.cuda.mem_get_info(device)
        used = total - free
    return max(0, used - reserved)


@contextlib.contextmanager
def memory_cap(device: torch.device, cap_gib: float | None, notes: list[str]) -> Iterator[None]:
    """Apply a run's memory cap on CUDA, restored (and the cache emptied) afterwards, since the
    worker process is reused for the next config.

    "Cap 24 GiB" means the run's total use of the device stays within 24 GiB: the caching
    allocator may use the cap less what this process already holds outside it (the CUDA
    context and driver), measured after emptying the cache. A cap below that overhead is an
    out-of-memory failure. A note in ``notes`` says how the cap was split.
    """
    if device.type != "cuda" or cap_gib is None:
        yield
        return
    torch.cuda.empty_cache()  # memory cached by a previous config would count against this cap
    total = torch.cuda.get_device_properties(device).total_memory
    overhead = context_overhead_bytes(device)
    allowed = cap_gib * GIB - overhead
    if allowed <= 0:
        raise RuntimeError(f"CUDA out of memory: the memory cap of {cap_gib:g} GiB is below the "
                           f"{overhead / GIB:.2f} GiB this process holds outside the allocator (CUDA context, driver)")
    torch.cuda.set_per_process_memory_fraction(min(1.0, allowed / total), device)
    notes.append(f"memory cap {cap_gib:g} GiB: {allowed / GIB:.2f} GiB for the caching allocator + "
                 f"{overhead / GIB:.2f} GiB CUDA context and driver (measured at the start of the run)")
    try:
        yield
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, device)
        torch.cuda.empty_cache()


def check_cpu_cap(cap_gib: float | None, peak_bytes: int) -> None:
    """On the CPU a cap is judged on the tracked tensor peak (what the run reports as its
    peak): a run over it is out of memory, whatever the address space says."""
    if cap_gib is not None and peak_bytes > cap_gib * GIB:
        raise MemoryError(f"peak tensor memory {peak_bytes / GIB:.3f} GiB exceeds the CPU memory cap of {cap_gib:g} GiB")
