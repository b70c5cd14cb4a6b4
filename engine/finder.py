"""Batch finder: the largest micro-batch that fits, and the fastest one among those tried.

Every trial is a real benchmark run in the worker (``worker.run``), so running
out of memory is a result (``status: "oom"``), never a crash of the caller. A trial *fits*
when it is ok and its peak allocated memory leaves ``margin`` of the capacity (the memory
cap, else the device) free: the allocator's fragmentation, the CUDA context and a longer
real run need that headroom.

Search: double the micro-batch from 1 until a trial does not fit (or ``max_batch``
is reached), then binary-search between the last fit and the first misfit. The fastest
batch (highest samples/s) among the fitting trials is often smaller than the largest: past
the point where the device is saturated, a bigger batch only costs memory.
Accumulation is kept as configured, so the effective batch changes with the micro-batch.
"""
from __future__ import annotations

import threading
import time
import uuid
from typing import Callable

from .config import BenchConfig, device_memory_limit
from .predict import DEFAULT_MARGIN, usable_bytes
from .progress import Progress, ProgressFn
from .results import Result
from .worker import run

Runner = Callable[..., Result]
# The search's defaults, the same on the command line and in the dashboard.
DEFAULT_MAX_BATCH = 1024
DEFAULT_TIME_LIMIT_S = 600.0


def _trial(result: Result, budget: float | None) -> dict:
    peak = result.metrics.peak_allocated_bytes
    fits = result.ok and (budget is None or (peak is not None and peak <= budget))
    return {
        "batch": result.config.batch,
        "status": result.status,
        "fits": fits,
        "peak_allocated_bytes": peak,
        "samples_per_s": result.metrics.samples_per_s,
        "result_id": result.id,
        "error": result.error,
    }


def find_batch(
    config: BenchConfig,
    max_batch: int = DEFAULT_MAX_BATCH,
    margin: float = DEFAULT_MARGIN,
    time_limit_s: float | None = DEFAULT_TIME_LIMIT_S,
    runner: Runner | None = None,
    progress: ProgressFn | None = None,
    on_result: Callable[[Result], None] | None = None,
    cancel: threading.Event | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> dict:
    """Search the largest fitting micro-batch of ``config`` in ``[1, max_batch]``.

    ``runner(config, progress, cancel, sweep_id=...)`` runs one trial and returns its
    result (the warm worker, ``worker.run``, by default; tests inject others); all trials share a sweep id. ``time_limit_s`` bounds the whole search: each
    trial's timeout is cut to the time left, and no trial starts after it. ``progress``
    gets the worker's events with ``trial`` (1-based) and ``batch`` added, ``on_result``
    each trial's full result (to store it).

    Returns ``max_batch`` (largest fitting micro-batch, None if not even batch 1 fits),
    ``best_batch`` (highest samples/s among fitting trials), ``sweep_id``, ``capacity_bytes``,
    ``budget_bytes``, ``margin``, ``limit`` (the max_batch asked for), ``trials`` (batch,
    status, fits, peak_allocated_bytes, samples_per_s, result_id, error, in run order),
    ``stopped`` (why the search ended early, or None) and ``exact`` (whether the largest
    fitting batch is pinned down: the next batch up was tried and did not fit; a search
    stopped by its batch or time limit gives a lower bound, ``exact`` False).
    """
    runner = runner or run
    if not isinstance(max_batch, int) or max_batch < 1:
        raise ValueError(f"max batch must be an integer >= 1, got {max_batch!r}")
    capacity = device_memory_limit(config)
    budget = usable_bytes(capacity, margin) if capacity is not None else None
    deadline = clock() + time_limit_s if time_limit_s is not None else None
    trials: list[dict] = []
    stopped = None
    sweep_id = uuid.uuid4().hex  # the trials are stored as one sweep

    def attempt(batch: int) -> dict | None:
        """Run one trial; None when the search must stop (time, cancel, error)."""
        nonlocal stopped
        timeout = config.timeout_s
        if deadline is not None:
            left = deadline - clock()
            if left <= 0:
                stopped = "time limit reached"
                return None
            timeout = min(timeout, left)
        number = len(trials) + 1

        def forward(event: Progress) -> None:
            if progress is not None:
                left = None if deadline is None else max(deadline - clock(), 0.0)
                progress(event.within(trial=number, batch=batch, limit_left_s=left))

        forward(Progress("starting"))
        result = runner(config.replace(batch=batch, timeout_s=timeout), forward, cancel, sweep_id=sweep_id)
        if on_result is not None:
            on_result(result)
        trial = _trial(result, budget)
        trials.append(trial)
        if result.status in ("error", "cancelled"):
            stopped = f"batch {batch}: {result.status}: {result.error}"
            return None
        if result.status == "timeout" and timeout < config.timeout_s:
            # Cut short by the search's time limit: says nothing about whether it fits.
            stopped = "time limit reached"
            return None
        # A trial slower than the config's own timeout counts as not fitting.
        return trial

    # Doubling: lo is the largest batch known to fit, hi the smallest known not to.
    lo, hi, batch = None, None, 1
    while True:
        trial = attempt(batch)
        if trial is None:
            break
        if not trial["fits"]:
            hi = batch
            break
        lo = batch
        if batch == max_batch:
            stopped = f"search limit reached: batch {max_batch} fits and no larger batch was tried"
            break
        batch = min(batch * 2, max_batch)
    # Binary search between them.
    while stopped is None and lo is not None and hi is not None and hi - lo > 1:
        mid = (lo + hi) // 2
        trial = attempt(mid)
        if trial is None:
            break
        if trial["fits"]:
            lo = mid
        else:
            hi = mid
    fitting = [t for t in trials if t["fits"] and t["samples_per_s"] is not None]
    best = max(fitting, key=lambda t: t["samples_per_s"])["batch"] if fitting else None
    return {
        "max_batch": lo,
        "best_batch": best,
        "sweep_id": sweep_id,
        "capacity_bytes": capacity,
        "budget_bytes": budget,
        "margin": margin,
        "limit": max_batch,
        # Pinned down only when the next batch up was tried and did not fit: a search that
        # ended at its own limit or in time has a lower bound, not an answer.
        "exact": lo is not None and hi is not None and hi - lo == 1,
        "stopped": stopped,
        "trials": trials,
    }
