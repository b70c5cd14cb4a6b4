"""Limits for a shared server: what one person may ask of a machine many people use.

A dashboard often serves a whole group on one GPU box, and its links and forms accept any
value a field allows (``batch=100000000``, ``steps=10^9``, a million-config sweep). These
limits bound what a *run* may request. They are settings (environment variables, read at
each check so a test or an operator can change them), and they never apply to reading
stored results: a teammate's file with more steps still imports and draws.

- ``check_limits(config)`` and ``check_field_limit(name, value)``: per-field caps (batch,
  accum, warm-up, steps, timeout, ranks), a ConfigError naming the field, the value and the limit.
- ``max_sweep()``: the most configurations one sweep may expand to (``sweep.expand``).
- ``check_memory(config)``: refuses a configuration whose analytic peak memory is several
  times the device's memory (or cap), before a worker is started for it.

``check_runnable`` (engine.config) calls ``check_limits`` and ``check_memory``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from .config import GIB, BenchConfig, ConfigError, device_memory_limit


@dataclass(frozen=True)
class Limit:
    """A cap set by an environment variable: on config field ``name``, or on a sweep's size,
    or the memory check's factor."""

    name: str
    variable: str
    default: float
    words: str  # what the cap bounds, for the README and messages

    def value(self) -> float:
        """The cap now in force: the variable's value, else the default."""
        return _setting(self.variable, self.default)


# The defaults leave room for any honest benchmark (the dashboard's defaults are batch 8,
# 3 + 10 steps, 600 s) while stopping requests that would hold a shared GPU for days.
FIELD_LIMITS: tuple[Limit, ...] = (
    Limit("batch", "TRADEOFF_LAB_MAX_BATCH", 65536, "largest micro-batch a run may request"),
    Limit("accum", "TRADEOFF_LAB_MAX_ACCUM", 1024, "most gradient-accumulation steps"),
    Limit("warmup", "TRADEOFF_LAB_MAX_WARMUP", 100, "most warm-up steps"),
    Limit("steps", "TRADEOFF_LAB_MAX_STEPS", 1000, "most measured steps"),
    Limit("timeout_s", "TRADEOFF_LAB_MAX_TIMEOUT_S", 3600, "longest timeout, in seconds"),
    Limit("nproc", "TRADEOFF_LAB_MAX_NPROC", 8, "most data-parallel ranks (processes) one run may start"),
)
LIMITS_BY_FIELD: dict[str, Limit] = {limit.name: limit for limit in FIELD_LIMITS}
MAX_SWEEP = Limit("sweep", "TRADEOFF_LAB_MAX_SWEEP", 1000, "most configurations in one sweep")
MEMORY_FACTOR = Limit("memory", "TRADEOFF_LAB_MEMORY_FACTOR", 4,
                      "refuse a run whose analytic peak memory exceeds this many times the device's memory (0: off)")


def _setting(variable: str, default: float) -> float:
    text = os.environ.get(variable, "").strip()
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value >= 0 or value == float("inf"):  # also catches nan
        raise ConfigError(variable, text, "a number >= 0 (a server setting; see the README's settings table)")
    return value


def limit_for(name: str) -> float | None:
    """The cap on config field ``name`` now in force, or None if the field has no cap
    (e.g. for a form's largest allowed value)."""
    limit = LIMITS_BY_FIELD.get(name)
    return limit.value() if limit is not None else None


def check_field_limit(name: str, value) -> None:
    """Raise ConfigError if ``value`` of config field ``name`` is above this server's cap
    (naming the field, the value, the cap and the variable that sets it). Values of fields
    without a cap, and None, always pass."""
    limit = LIMITS_BY_FIELD.get(name)
    if limit is None or value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    cap = limit.value()
    if value > cap:
        raise ConfigError(name, value, f"at most {cap:g} on this server ({limit.variable}; the {limit.words})")


def check_limits(config: BenchConfig) -> None:
    """Raise ConfigError for the first field of ``config`` above this server's caps."""
    for limit in FIELD_LIMITS:
        check_field_limit(limit.name, getattr(config, limit.name))


def max_sweep() -> int:
    """The most configurations one sweep may expand to."""
    return int(MAX_SWEEP.value())


def check_memory(config: BenchConfig) -> None:
    """Raise ConfigError if ``config``'s analytic peak memory is more than
    ``TRADEOFF_LAB_MEMORY_FACTOR`` times the memory it may use here (its cap, else the
    device's capacity), with the estimate in the message.

    Models without an activation formula are judged by what is exact for them (parameters,
    gradients and optimizer state, a lower bound of the peak); a model that cannot be
    built on the meta device, or an unknown capacity, passes. The check is deliberately
    coarse (several times over, not "does it fit"): the batch finder and honest near-misses
    get their real OOM, which is a result.
    """
    factor = MEMORY_FACTOR.value()
    if factor == 0:
        return
    limit = device_memory_limit(config)
    if limit is None:
        return
    from .predict import analytic_estimate  # builds the model on the meta device: loads torch

    estimate = analytic_estimate(config)
    if estimate is None:
        return
    peak, qualifier = estimate.peak_bound()
    if peak > factor * limit:
        what = f"its {config.memory_cap_gib:g} GiB memory cap" if config.memory_cap_gib is not None else \
            f"this device's {_size(limit)}"
        raise ConfigError(
            "batch", config.batch,
            f"a configuration that could fit: the analytic estimate of its peak memory is {qualifier} "
            f"{_size(peak)}, more than {factor:g}× {what}; lower the batch or the model size "
            f"(or, from the command line, --force runs it anyway)")


def _size(num_bytes: float) -> str:
    return f"{num_bytes / GIB:.2f} GiB" if num_bytes >= GIB / 100 else f"{num_bytes / 2**20:.2f} MiB"
