"""Run one benchmark configuration in this process and return its v1 result.

The order of a run is the method (ARCHITECTURE.md, "How to measure"):

1. build the model on the device, apply checkpointing, make the batches on the device;
2. warm-up steps (never measured: kernel selection, allocator growth, optimizer state);
3. reset CUDA peak statistics, then the timed steps, each timed phase by phase with the
   device's timer (CUDA events + one synchronisation per step, ``perf_counter`` on CPU);
4. one separate instrumented step for the memory breakdown (``memory.py``);
5. one separate step under the FLOP counter (``flops.py``);
6. the gradients' distance from the fp32/no-checkpointing baseline (``numerics.py``, two
   first steps on fresh models).

Steps 4 to 6 come after the timing, so their instrumentation never slows a timed step.
``run_benchmark`` raises on failure; the worker turns exceptions into oom/error results.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch

from . import flops, memory, models, numerics, results
from .config import GIB, BenchConfig, resolve_device
from .envinfo import env_info
from .stats import NOISE_THRESHOLD, Summary
from .step import build_step, make_timer

PHASE_KEYS = ("step_ms", "forward_ms", "backward_ms", "optimizer_ms")
Progress = Callable[[dict], None]


class _Nvml:
    """NVML view of one CUDA device: used memory and the energy counter; None when NVML,
    the driver or the counter is unavailable (NVML is optional)."""

    def __init__(self, device: torch.device):
        self.handle = None
        try:
            import pynvml

            pynvml.nvmlInit()
        except Exception:  # no nvidia-ml-py or no driver: NVML figures are unknown
            return
        self._pynvml = pynvml
        try:
            self.handle = self._handle_for(pynvml, device)
        except Exception:
            self.close()

    @staticmethod
    def _handle_for(pynvml, device: torch.device):
        # The UUID names the same GPU in CUDA and NVML even when CUDA_VISIBLE_DEVICES
        # reorders or hides devices (a plain index would not).
        uuid = str(torch.cuda.get_device_properties(device).uuid)
        try:
            return pynvml.nvmlDeviceGetHandleByUUID(uuid if uuid.startswith(("GPU-", "MIG-")) else f"GPU-{uuid}")
        except Exception:
            # torch's own CUDA -> NVML index mapping (it honours CUDA_VISIBLE_DEVICES).
            return pynvml.nvmlDeviceGetHandleByIndex(torch.cuda._get_nvml_device_index(device))

    def used_bytes(self) -> int | None:
        """Device memory in use by all processes (includes CUDA contexts), or None."""
        if self.handle is None:
            return None
        try:
            return int(self._pynvml.nvmlDeviceGetMemoryInfo(self.handle).used)
        except Exception:
            return None

    def energy_mj(self) -> int | None:
        """Total energy the GPU used since the driver loaded, in mJ (Volta+), or None."""
        if self.handle is None:
            return None
        try:
            return int(self._pynvml.nvmlDeviceGetTotalEnergyConsumption(self.handle))
        except Exception:
            return None

    def close(self) -> None:
        """Release NVML (idempotent)."""
        if getattr(self, "_pynvml", None) is not None:
            try:
                self._pynvml.nvmlShutdown()
            except Exception:
                pass  # shutting down a half-initialised NVML has nothing left to release
            self._pynvml = None
        self.handle = None


@contextlib.contextmanager
def _on_device(device: torch.device, config: BenchConfig) -> Iterator[None]:
    """Make ``device`` current (CUDA events record on the current device's stream) and
    apply the CUDA memory cap; undo both and return cached memory afterwards, because the
    worker process is reused for the next config."""
    if device.type != "cuda":
        yield
        return
    with torch.cuda.device(device):
        # Memory cached by a previous config would count against this run's cap.
        torch.cuda.empty_cache()
        if config.memory_cap_gib is not None:
            total = torch.cuda.get_device_properties(device).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, config.memory_cap_gib * GIB / total), device)
        try:
            yield
        finally:
            if config.memory_cap_gib is not None:
                torch.cuda.set_per_process_memory_fraction(1.0, device)
            torch.cuda.empty_cache()


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def _skipped_steps(scales: list[float]) -> int:
    """Steps GradScaler skipped (inf/NaN gradients), from the loss scale read after each
    step: a skipped step always multiplies the scale by the backoff factor (< 1), a normal
    step never lowers it."""
    return sum(1 for before, after in zip(scales, scales[1:]) if after < before)


def _warnings(summaries: dict[str, Summary], steps: int, skipped: int | None, retries: int | None) -> list[str]:
    notes = []
    for key, summary in summaries.items():
        if summary.noisy:
            notes.append(
                f"{key} is noisy: IQR/median {summary.iqr_rel:.0%} > {NOISE_THRESHOLD:.0%} over {steps} steps "
                "(more steps or a quieter machine give steadier figures)"
            )
    if skipped:
        notes.append(f"{skipped} of {steps} timed steps were skipped by GradScaler (inf/NaN gradients)")
    if retries:
        notes.append(
            f"the CUDA caching allocator freed its cache and retried {retries} time(s) during the timed steps: "
            "they include memory-pressure stalls"
        )
    return notes


def run_benchmark(config: BenchConfig, progress: Progress | None = None) -> dict:
    """Benchmark ``config`` in this process; return a complete ``ok`` result dict.

    ``progress`` receives ``{"phase", "step", "total"}`` events (phases build, warmup,
    measure, breakdown, flops). Raises on failure (OOM included; an OOM of the numerics
    baseline only is a warning with ``grad_rel_diff`` None).
    """
    emit = progress or (lambda event: None)
    device_str = resolve_device(config.device)
    device = torch.device(device_str)
    env = env_info(device_str)
    is_cuda = device.type == "cuda"

    with _on_device(device, config):
        emit({"phase": "build", "step": 0, "total": 1})
        step = build_step(config)
        emit({"phase": "build", "step": 1, "total": 1})

        for i in range(config.warmup):
            step.run()
            emit({"phase": "warmup", "step": i + 1, "total": config.warmup})
        _synchronize(device)

        nvml = _Nvml(device) if is_cuda else None
        try:
            if is_cuda:
                torch.cuda.reset_peak_memory_stats(device)
                retries_before = torch.cuda.memory_stats(device).get("num_alloc_retries", 0)
                energy_before = nvml.energy_mj()
            timer = make_timer(device)
            samples: dict[str, list[float]] = {key: [] for key in PHASE_KEYS}
            # Read between steps, after the timer's synchronisation: never inside a timed step.
            scales = [step.scaler.get_scale()] if step.scaler is not None else None
            for i in range(config.steps):
                step.run(timer)
                times = timer.collect()
                for key in PHASE_KEYS:
                    samples[key].append(times[key])
                if scales is not None:
                    scales.append(step.scaler.get_scale())
                emit({"phase": "measure", "step": i + 1, "total": config.steps})
            _synchronize(device)

            cuda_metrics = {"peak_reserved_bytes": None, "nvml_used_bytes": None, "allocator_retries": None}
            energy_j = None
            if is_cuda:
                stats = torch.cuda.memory_stats(device)
                cuda_metrics = {
                    "peak_allocated_bytes": int(stats["allocated_bytes.all.peak"]),
                    "peak_reserved_bytes": int(stats["reserved_bytes.all.peak"]),
                    # Sampled while the timed steps' memory is still cached; NVML also counts
                    # the CUDA context, which the allocator never sees.
                    "nvml_used_bytes": nvml.used_bytes(),
                    "allocator_retries": int(stats.get("num_alloc_retries", 0) - retries_before),
                }
                energy_after = nvml.energy_mj()
                if energy_before is not None and energy_after is not None and energy_after > energy_before:
                    # Whole-GPU energy (other processes on the GPU included) over the timed steps.
                    energy_j = (energy_after - energy_before) / 1000.0 / (config.steps * config.effective_batch)
        finally:
            if nvml is not None:
                nvml.close()

        emit({"phase": "breakdown", "step": 0, "total": 1})
        breakdown = memory.memory_breakdown(step)
        emit({"phase": "breakdown", "step": 1, "total": 1})
        emit({"phase": "flops", "step": 0, "total": 1})
        model_flops, hw_flops = flops.count_flops(step)
        emit({"phase": "flops", "step": 1, "total": 1})
        tokens = models.tokens_per_sample(step.model)
        tf32 = flops.fp32_uses_tf32(step.model) if config.precision == "fp32" else False
        # The numerical cost (numerics.py) runs two more first steps on fresh models: after
        # everything measured, with this run's model freed so they can use its memory, and
        # still on this device under this run's memory cap.
        del step
        grad_rel_diff, numerics_warning = numerics.grad_rel_diff(config)

    summaries = {key: Summary.from_samples(values) for key, values in samples.items()}
    step_s = summaries["step_ms"].median / 1000.0
    samples_per_s = config.effective_batch / step_s if step_s > 0 else None
    mfu = flops.mfu(model_flops, step_s, env["device_name"], config.precision, tf32) if is_cuda else None
    skipped = _skipped_steps(scales) if scales is not None else None
    metrics = {
        "effective_batch": config.effective_batch,
        **{key: summary.to_dict() for key, summary in summaries.items()},
        "samples_per_s": samples_per_s,
        "tokens_per_s": samples_per_s * tokens if tokens and samples_per_s else None,
        # Without a caching allocator to ask (CPU, MPS) the peak is the instrumented step's.
        "peak_allocated_bytes": sum(breakdown.values()),
        **cuda_metrics,
        "memory_breakdown_bytes": breakdown,
        "flops_per_step": model_flops,
        "hw_flops_per_step": hw_flops,
        "mfu": mfu,
        "loss_scale": scales[-1] if scales is not None else None,
        "skipped_steps": skipped,
        "energy_j_per_sample": energy_j,
        "grad_rel_diff": grad_rel_diff,
    }
    warnings = _warnings(summaries, config.steps, skipped, cuda_metrics["allocator_retries"])
    warnings += [numerics_warning] if numerics_warning else []
    return results.new_result(config, "ok", env, metrics=metrics, samples=samples, warnings=warnings)
