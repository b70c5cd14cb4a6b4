"""The throughput-vs-memory frontier of stored runs and the configuration recommender.

Works on stored Results only, so it needs no device (and no torch): a laptop can recommend from
a teammate's H100 runs. Runs of different models or environments are never mixed: every
function here first narrows the runs to one model (preset plus overrides) in one
environment (``Result.environment``: where the runs come from and the machine's
fingerprint), by default the runs measured on this machine when there are any.
"""
from __future__ import annotations

from collections import Counter
from typing import Iterable

from .config import DESCRIBED_FIELDS, GIB, BenchConfig
from .results import Result


class SelectionError(ValueError):
    """The runs hold several models or environments and the caller did not say which one."""


# ------------------------------------------------------------------------- selecting runs
def groups(results: Iterable[Result]) -> Counter:
    """How many runs there are per (model label, environment id)."""
    return Counter((r.config.model_label, r.environment_id) for r in results)


def measured_here(result: Result, host_id: str) -> bool:
    """Whether this installation measured ``result`` on this machine."""
    return result.origin == "here" and result.env.host_id == host_id


def one_environment(results: Iterable[Result], env: str | None = None, host_id: str | None = None) -> list[Result]:
    """The runs of one environment: ``env`` (an environment id) when given; else the runs
    measured here (on the machine ``host_id``) when there are any, else the input's; the
    chosen runs must then hold one environment, or SelectionError lists them to pick from."""
    runs = list(results)
    if env is not None:
        runs = [r for r in runs if r.environment_id == env]
        if not runs:
            raise SelectionError(f"no runs in environment {env!r}")
        return runs
    here = [r for r in runs if host_id is not None and measured_here(r, host_id)]
    runs = here or runs
    seen = {r.environment_id: r.environment_words for r in runs}
    if len(seen) > 1:
        raise SelectionError("the runs come from several environments (" + "; ".join(sorted(seen.values()))
                             + "); pick one")
    return runs


def select_runs(results: Iterable[Result], model: str | None = None, env: str | None = None,
                host_id: str | None = None) -> list[Result]:
    """The runs of one model (its label, or a preset name) in one environment
    (``one_environment``). ``None`` model means "the only one there is"; when the runs hold
    several, SelectionError names them so the caller can pick."""
    runs = list(results)
    if model is not None:
        # An exact label picks those runs; a bare preset name picks every variant of it.
        exact = [r for r in runs if r.config.model_label == model]
        runs = exact or [r for r in runs if r.config.model == model]
        if not runs:
            raise SelectionError(f"no runs of model {model!r}")
    models_seen = sorted({r.config.model_label for r in runs})
    if len(models_seen) > 1:
        raise SelectionError(f"the runs hold several models ({'; '.join(models_seen)}); pick one")
    return one_environment(runs, env, host_id)


# ------------------------------------------------------------------------- frontier
def measured(results: Iterable[Result]) -> list[Result]:
    """Ok runs that have both a throughput and a peak memory."""
    return [r for r in results if r.ok and r.metrics.samples_per_s is not None and r.metrics.peak_allocated_bytes is not None]


def pareto_frontier(results: Iterable[Result]) -> list[Result]:
    """Ok runs not dominated in (less peak memory, more samples/s), by increasing memory.

    A run is dropped when another uses no more memory and is at least as fast (an exact
    duplicate keeps only its first occurrence).
    """
    ordered = sorted(measured(results), key=lambda r: (r.metrics.peak_allocated_bytes, -r.metrics.samples_per_s))
    frontier, fastest = [], float("-inf")
    for run in ordered:
        if run.metrics.samples_per_s > fastest:
            frontier.append(run)
            fastest = run.metrics.samples_per_s
    return frontier


# ------------------------------------------------------------------------- recommender
def throughput_range(result: Result) -> tuple[float, float]:
    """The run's samples/s from its slow (p90) to its fast (p10) step."""
    m = result.metrics
    step = m.step_ms
    if not step or not step.p10 or not step.p90:
        return m.samples_per_s, m.samples_per_s
    return m.samples_per_s * step.median / step.p90, m.samples_per_s * step.median / step.p10


def too_close(a: Result, b: Result) -> bool:
    """Whether two runs' throughputs differ by less than their own step-to-step spread."""
    (a_low, a_high), (b_low, b_high) = throughput_range(a), throughput_range(b)
    return a_low <= b_high and b_low <= a_high


def _entry(result: Result, budget_bytes: float) -> dict:
    peak = result.metrics.peak_allocated_bytes
    return {
        "id": result.id,
        "config": result.config.to_dict(),
        "samples_per_s": result.metrics.samples_per_s,
        "samples_per_s_range": list(throughput_range(result)),
        "noisy": result.noisy,
        "peak_allocated_bytes": peak,
        "margin_bytes": budget_bytes - peak,
    }


def rate_words(value: float) -> str:
    """A throughput with enough digits to tell close figures apart (three significant)."""
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


def _describe(entry: dict, budget_gib: float) -> str:
    noisy = " (noisy: step time varies more than 10 %)" if entry["noisy"] else ""
    return (
        f"{BenchConfig.from_dict(entry['config']).describe(with_model=False)}: {rate_words(entry['samples_per_s'])} "
        f"samples/s{noisy} at {entry['peak_allocated_bytes'] / GIB:,.3g} GiB of {budget_gib:g} GiB"
    )


def recommend(
    results: Iterable[Result],
    effective_batch: int,
    memory_budget_gib: float,
    model: str | None = None,
    env: str | None = None,
    host_id: str | None = None,
) -> dict:
    """The fastest measured configuration of ``effective_batch`` whose peak fits the budget.

    Returns ``fits``, ``best`` and ``runner_up`` (each id, config, samples_per_s,
    peak_allocated_bytes, margin_bytes, or None), ``closest`` (when nothing fits: the run
    at that effective batch needing the least memory), counts, and ``answer`` in words.
    Raises SelectionError when the runs mix models or environments and none was picked
    (``host_id``: this machine, whose own runs are the default).
    """
    if effective_batch < 1:
        raise ValueError(f"effective batch must be >= 1, got {effective_batch}")
    if not memory_budget_gib > 0:
        raise ValueError(f"memory budget must be > 0 GiB, got {memory_budget_gib}")
    runs = select_runs(results, model, env, host_id)
    budget = memory_budget_gib * GIB
    at_batch = [r for r in runs if r.metrics.effective_batch == effective_batch]
    candidates = measured(at_batch)
    fitting = sorted((r for r in candidates if r.metrics.peak_allocated_bytes <= budget),
                     key=lambda r: (-r.metrics.samples_per_s, r.metrics.peak_allocated_bytes))
    # A noisy winner within a steady runner-up's spread is no winner: prefer the steady run.
    if len(fitting) > 1 and fitting[0].noisy and not fitting[1].noisy and too_close(fitting[0], fitting[1]):
        fitting[0], fitting[1] = fitting[1], fitting[0]
    close = len(fitting) > 1 and too_close(fitting[0], fitting[1])
    answer = {
        "fits": bool(fitting),
        "effective_batch": effective_batch,
        "memory_budget_bytes": budget,
        "best": _entry(fitting[0], budget) if fitting else None,
        "runner_up": _entry(fitting[1], budget) if len(fitting) > 1 else None,
        "closest": None,
        "considered": len(candidates),
        "over_budget": len(candidates) - len(fitting),
        "failed": sum(not r.ok for r in at_batch),
        "too_close_to_call": close,
        "environment": runs[0].environment_words if runs else None,
    }
    if fitting:
        best = answer["best"]
        words = f"Best: {_describe(best, memory_budget_gib)}."
        if answer["runner_up"]:
            runner = answer["runner_up"]
            slower = 1 - runner["samples_per_s"] / best["samples_per_s"] if best["samples_per_s"] else 0.0
            words += f" Runner-up: {_describe(runner, memory_budget_gib)} ({slower:.1%} slower)."
            if close:
                words += (" Too close to call: the two differ by less than their own step-to-step spread; "
                          "measure more steps (or on a quieter machine) to tell them apart.")
        answer["answer"] = words
        return answer
    if candidates:
        closest = min(candidates, key=lambda r: r.metrics.peak_allocated_bytes)
        answer["closest"] = _entry(closest, budget)
        answer["answer"] = (
            f"Nothing measured at effective batch {effective_batch} fits {memory_budget_gib:g} GiB. "
            f"Closest: {_describe(answer['closest'], memory_budget_gib)}, "
            f"{(closest.metrics.peak_allocated_bytes - budget) / GIB:,.2f} GiB over."
        )
    else:
        available = sorted({r.metrics.effective_batch for r in measured(runs)})
        answer["answer"] = (
            f"Nothing fits: no successful run at effective batch {effective_batch}"
            + (f" (measured: {', '.join(map(str, available))})." if available else ".")
        )
    return answer


# The settings besides precision and checkpointing that make a candidate its own variant
# (optimizer, its implementation, attention...): the described fields.
_VARIANT_FIELDS = tuple(f.name for f in DESCRIBED_FIELDS)


def _variant(config: BenchConfig) -> tuple:
    """The settings a candidate shares with its smaller-micro-batch siblings."""
    return (config.precision, config.ckpt, config.k if config.ckpt == "every-k" else None,
            *(getattr(config, name) for name in _VARIANT_FIELDS))


def missing_candidates(
    results: Iterable[Result],
    effective_batch: int,
    memory_budget_gib: float,
    model: str | None = None,
    env: str | None = None,
    host_id: str | None = None,
) -> list[BenchConfig]:
    """Configurations the recommendation depends on that were never measured.

    The candidate space is every micro-batch dividing ``effective_batch`` (accum = N / batch)
    × every (precision, checkpointing, optimizer, attention...) combination already measured for this model:
    the dimensions the user chose to explore. A candidate is left out when it was run (any
    status but cancelled), or when the same settings at a smaller-or-equal micro-batch ran
    out of memory or exceeded the budget (memory grows with the micro-batch).
    Other fields (model, overrides, steps, device, ...) come from the newest run.
    """
    runs = select_runs(results, model, env, host_id)
    if not runs:
        return []
    budget = memory_budget_gib * GIB
    template = max(runs, key=lambda r: r.created_at).config
    variants = {_variant(r.config): r.config for r in runs}
    done = {(r.config.batch, r.config.accum, _variant(r.config)) for r in runs if r.status != "cancelled"}
    too_big: dict[tuple, int] = {}  # variant -> smallest micro-batch known not to fit
    for r in runs:
        peak = r.metrics.peak_allocated_bytes
        if r.status == "oom" or (r.ok and peak is not None and peak > budget):
            v = _variant(r.config)
            too_big[v] = min(too_big.get(v, r.config.batch), r.config.batch)
    out = []
    for variant, source in sorted(variants.items(), key=lambda kv: repr(kv[0])):
        for batch in (b for b in range(1, effective_batch + 1) if effective_batch % b == 0):
            accum = effective_batch // batch
            if (batch, accum, variant) in done or batch >= too_big.get(variant, effective_batch + 1):
                continue
            out.append(template.replace(batch=batch, accum=accum, precision=source.precision, ckpt=source.ckpt,
                                        k=source.k, **{name: getattr(source, name) for name in _VARIANT_FIELDS}))
    return out
