"""Every speed-up and memory saving the tool shows, computed one way, against a named baseline.

A run's baseline is a run of the same model (with its dimensions), measured in the same
environment, at the same effective batch: in fp32 without checkpointing or torch.compile, the fastest such
micro-batch unless the user picks another run. So one pair of runs has one speed-up on every
page, a run never gains against a run of another machine, and every table can name the run
it compares with. Runs of different effective batches are not compared: they train on
different amounts of data per step.
"""
from __future__ import annotations

from typing import Iterable

from .results import Result

BASELINE_SETTINGS = {"precision": "fp32", "ckpt": "none", "compile": "none"}


def comparable(a: Result, b: Result) -> bool:
    """Whether a speed-up between the two runs means something: same model and dimensions,
    same environment, same effective batch."""
    return (a.config.model_label == b.config.model_label and a.environment == b.environment
            and a.metrics.effective_batch == b.metrics.effective_batch)


def _usable(run: Result) -> bool:
    return run.ok and run.metrics.samples_per_s is not None


def default_baseline(run: Result, candidates: Iterable[Result]) -> Result | None:
    """The fastest fp32, no-checkpointing, eager run comparable with ``run`` (possibly ``run``)."""
    pool = [c for c in candidates if _usable(c) and comparable(c, run)
            and all(getattr(c.config, k) == v for k, v in BASELINE_SETTINGS.items())]
    return max(pool, key=lambda c: c.metrics.samples_per_s, default=None)


def baseline_for(run: Result, candidates: list[Result], chosen: Result | None = None) -> Result | None:
    """``run``'s baseline: the ``chosen`` run when comparable with it, else the default."""
    if chosen is not None:
        return chosen if comparable(chosen, run) and _usable(chosen) else None
    return default_baseline(run, candidates)


def gain_rows(results: Iterable[Result], candidates: Iterable[Result] | None = None,
              baseline_id: str | None = None) -> list[dict]:
    """One row per ok run of ``results``: what it saves and what it costs against its baseline.

    ``candidates``: the runs baselines are chosen from (every stored run, so a page showing a
    few runs still compares them with the same baseline as any other page; default:
    ``results``). ``baseline_id``: a run the user picked as the baseline. Keys: id, config,
    samples_per_s, peak_allocated_bytes, speedup and memory_saving (against the baseline, or
    None), baseline_id and baseline (the baseline in words, or why there is none),
    grad_rel_diff, loss_scale, skipped_steps, energy_j_per_sample.
    """
    results = list(results)
    pool = list(candidates) if candidates is not None else results
    chosen = next((r for r in pool + results if r.id == baseline_id), None) if baseline_id else None
    rows = []
    for run in (r for r in results if r.ok):
        base = baseline_for(run, pool, chosen)
        m = run.metrics
        speed, peak = m.samples_per_s, m.peak_allocated_bytes
        base_speed = base.metrics.samples_per_s if base else None
        base_peak = base.metrics.peak_allocated_bytes if base else None
        rows.append({
            "id": run.id,
            "config": run.config,
            "samples_per_s": speed,
            "peak_allocated_bytes": peak,
            "speedup": speed / base_speed if speed and base_speed else None,
            "memory_saving": 1 - peak / base_peak if peak is not None and base_peak else None,
            "baseline_id": base.id if base else None,
            "baseline": _baseline_words(run, base, chosen),
            "grad_rel_diff": m.grad_rel_diff,
            "loss_scale": m.loss_scale,
            "skipped_steps": m.skipped_steps,
            "energy_j_per_sample": m.energy_j_per_sample,
        })
    return rows


def _baseline_words(run: Result, base: Result | None, chosen: Result | None) -> str:
    if base is not None:
        return f"{base.config.describe(with_model=False)} (run {base.id[:8]})" + (" — itself" if base.id == run.id else "")
    if chosen is not None:
        return "none: the chosen baseline is another model, environment or effective batch"
    return (f"none: no fp32, no-checkpointing run of {run.config.model_label} at effective batch "
            f"{run.metrics.effective_batch} in this environment")
