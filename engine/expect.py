"""What a run will cost before it starts: its analytic peak memory against the memory it may
use, and its expected duration (from similar runs measured here, else by FLOPs from this
machine's measured FLOP rate), each with what it rests on, or "unknown"."""
from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Iterable

from .config import BenchConfig, device_memory_limit, gib_words
from .devices import resolve_device
from .frontier import measured_here
from .predict import analytic_estimate, curve_key, decoder_shape, model_param_count
from .progress import duration_words
from .results import Result

# Besides warm-up and timed steps a run makes one step each for the memory breakdown, the FLOP
# count and the gradient check.
EXTRA_STEPS = 3
# Longer than this and the page warns before starting (gpt-xl on a CPU).
LONG_RUN_S = 180.0


@dataclass(frozen=True)
class Expectation:
    """A run's expected peak memory and duration, each with its basis."""

    peak_bytes: float | None
    peak_words: str  # "about" (a full analytic estimate) or "at least" (weights and optimizer state only)
    limit_bytes: float | None  # its memory cap, else the device's capacity
    seconds: float | None
    duration_basis: str

    @property
    def fits(self) -> bool | None:
        """Whether the analytic peak is within the limit; None when either is unknown."""
        if self.peak_bytes is None or self.limit_bytes is None:
            return None
        return self.peak_bytes <= self.limit_bytes

    def warnings(self) -> list[str]:
        """What to say before starting: it will not fit, or it will take long."""
        notes = []
        if self.fits is False:
            notes.append(f"This will most likely not fit: the analytic peak is {self.peak_words} "
                         f"{gib_words(self.peak_bytes)}, above the {gib_words(self.limit_bytes)} it may use here.")
        if self.seconds is not None and self.seconds > LONG_RUN_S:
            notes.append(f"This will take about {duration_words(self.seconds)} on this machine ({self.duration_basis}).")
        return notes

    def words(self) -> str:
        """The expectation in one line."""
        if self.peak_bytes is None:
            peak = "peak memory unknown (the model has no analytic estimate)"
        else:
            limit = f" of {gib_words(self.limit_bytes)}" if self.limit_bytes else ""
            peak = f"peak {self.peak_words} {gib_words(self.peak_bytes)}{limit} (analytic estimate)"
        duration = (f"about {duration_words(self.seconds)} ({self.duration_basis})" if self.seconds is not None
                    else f"duration unknown: {self.duration_basis}")
        return f"Expected: {peak} · {duration}"


def analytic_flops_per_step(config: BenchConfig) -> float | None:
    """Training FLOPs of one optimizer step of a built-in GPT or an ``hf:`` transformer: 6 ×
    matmul parameters per token plus attention's 12 × layers × hidden × seq_len (PaLM,
    appendix B), plus one more forward (2 × per token) when checkpointing recomputes it.
    Embedding lookups are no matmul: learned positions and an untied input embedding are left
    out (a tied one is the output head's matmul). None for other models."""
    shape = decoder_shape(config)
    n_params = model_param_count(config) if shape is not None else None
    if n_params is None:
        return None
    n_matmul = n_params - shape.position_rows * shape.hidden - (0 if shape.tied else shape.vocab * shape.hidden)
    per_token = 6 * n_matmul + 12 * shape.layers * shape.hidden * shape.seq_len
    if config.ckpt != "none":
        per_token += 2 * n_matmul
    return per_token * shape.seq_len * config.batch * config.accum


def expected_seconds(config: BenchConfig, runs: Iterable[Result], host_id: str) -> tuple[float | None, str]:
    """(seconds, basis) of a run of ``config``: from the nearest batch of the same
    configuration measured on this machine (step time scaled by the batch), else from this
    machine's measured FLOP rate on the same device type and the config's analytic FLOPs,
    else (None, why)."""
    device_type = resolve_device(config.device).split(":")[0]
    here = [r for r in runs if r.ok and r.metrics.step_ms is not None and measured_here(r, host_id)
            and r.env.device_type == device_type]
    steps = config.warmup + config.steps + EXTRA_STEPS
    key = curve_key(config.to_dict())
    same = [r for r in here if curve_key(r.config.to_dict()) == key]
    if same:
        nearest = min(same, key=lambda r: (abs(r.config.batch - config.batch), r.config.batch))
        step_s = nearest.metrics.step_ms.median / 1000 * config.batch / nearest.config.batch
        return steps * step_s, f"from a run of this configuration at batch {nearest.config.batch} measured here"
    rates = [r.metrics.hw_flops_per_step / (r.metrics.step_ms.median / 1000) for r in here
             if r.metrics.hw_flops_per_step and r.metrics.step_ms.median > 0]
    flops = analytic_flops_per_step(config)
    if rates and flops:
        rate = statistics.median(rates)
        return (steps * flops / rate,
                f"by FLOPs, at the {rate / 1e9:.3g} GFLOP/s that {len(rates)} run(s) measured here reached")
    if not here:
        return None, f"no run measured on this {device_type} here yet to extrapolate from"
    return None, "no similar run measured here, and no FLOP formula for this model"


def expect(config: BenchConfig, runs: Iterable[Result], host_id: str) -> Expectation:
    """The expected peak memory and duration of a run of ``config`` on this machine."""
    estimate = analytic_estimate(config)
    peak, words = estimate.peak_bound() if estimate is not None else (None, "about")
    seconds, basis = expected_seconds(config, runs, host_id)
    return Expectation(peak, words, device_memory_limit(config), seconds, basis)
