"""The throughput-vs-memory frontier of stored runs and the configuration recommender.

Works on result dicts (schema v1) only, so it needs no device: a laptop can recommend from
a teammate's H100 runs. Runs of different models or devices are never mixed: every
function here first narrows the runs to one model (preset plus overrides) on one device.
"""
from __future__ import annotations

from collections import Counter
from typing import Iterable

from .config import GIB, BenchConfig


class SelectionError(ValueError):
    """The runs hold several models or devices and the caller did not say which one."""


# ------------------------------------------------------------------------- selecting runs
def model_label(config: dict) -> str:
    """A model with its overrides, e.g. ``gpt-tiny (n_layers=2, seq_len=32)``."""
    overrides = config.get("overrides") or {}
    if not overrides:
        return config["model"]
    return f"{config['model']} ({', '.join(f'{k}={v}' for k, v in sorted(overrides.items()))})"


def device_label(result: dict) -> str:
    """The device a run was measured on (its name, else its type)."""
    env = result.get("env") or {}
    return env.get("device_name") or env.get("device_type") or "unknown device"


def groups(results: Iterable[dict]) -> Counter:
    """How many runs there are per (model label, device label)."""
    return Counter((model_label(r["config"]), device_label(r)) for r in results)


def select_runs(results: Iterable[dict], model: str | None = None, device: str | None = None) -> list[dict]:
    """The runs of one model (its label, or a preset name) on one device.

    ``None`` means "the only one there is"; when the runs hold several, SelectionError
    names them so the caller can pick.
    """
    runs = list(results)
    if model is not None:
        # An exact label picks those runs; a bare preset name picks every variant of it.
        exact = [r for r in runs if model_label(r["config"]) == model]
        runs = exact or [r for r in runs if r["config"]["model"] == model]
        if not runs:
            raise SelectionError(f"no runs of model {model!r}")
    if device is not None:
        runs = [r for r in runs if device_label(r) == device]
        if not runs:
            raise SelectionError(f"no runs on device {device!r}")
    models_seen = sorted({model_label(r["config"]) for r in runs})
    if len(models_seen) > 1:
        raise SelectionError(f"the runs hold several models ({'; '.join(models_seen)}); pick one")
    devices_seen = sorted({device_label(r) for r in runs})
    if len(devices_seen) > 1:
        raise SelectionError(f"the runs come from several devices ({'; '.join(devices_seen)}); pick one")
    return runs


# ------------------------------------------------------------------------- frontier
def _throughput(result: dict) -> float | None:
    return result["metrics"].get("samples_per_s")


def _peak(result: dict) -> float | None:
    return result["metrics"].get("peak_allocated_bytes")


def measured(results: Iterable[dict]) -> list[dict]:
    """Ok runs that have both a throughput and a peak memory."""
    return [r for r in results if r["status"] == "ok" and _throughput(r) is not None and _peak(r) is not None]


def pareto_frontier(results: Iterable[dict]) -> list[dict]:
    """Ok runs not dominated in (less peak memory, more samples/s), by increasing memory.

    A run is dropped when another uses no more memory and is at least as fast (an exact
    duplicate keeps only its first occurrence).
    """
    ordered = sorted(measured(results), key=lambda r: (_peak(r), -_throughput(r)))
    frontier, fastest = [], float("-inf")
    for run in ordered:
        if _throughput(run) > fastest:
            frontier.append(run)
            fastest = _throughput(run)
    return frontier


def capacity_bytes(result: dict) -> float | None:
    """The memory a run was allowed: its memory cap, else its device's capacity."""
    cap = result["config"].get("memory_cap_gib")
    return cap * GIB if cap else (result.get("env") or {}).get("capacity_bytes")


# ------------------------------------------------------------------------- recommender
def config_words(config: dict) -> str:
    """A configuration in words: ``batch 8 × accum 4, bf16, checkpointing every 2nd block``."""
    ckpt = config["ckpt"]
    if ckpt == "every-k":
        k = config.get("k", 2)
        ordinal = {1: "", 2: "2nd ", 3: "3rd "}.get(k, f"{k}th ")
        ckpt_words = f"checkpointing every {ordinal}block"
    else:
        ckpt_words = {"none": "no checkpointing", "full": "full checkpointing", "selective": "selective checkpointing"}[ckpt]
    parts = [f"batch {config['batch']} × accum {config['accum']}", config["precision"], ckpt_words]
    if config.get("optimizer", "adamw") != "adamw":
        parts.append(config["optimizer"])
    return ", ".join(parts)


def _entry(result: dict, budget_bytes: float) -> dict:
    peak = _peak(result)
    return {
        "id": result["id"],
        "config": result["config"],
        "samples_per_s": _throughput(result),
        "peak_allocated_bytes": peak,
        "margin_bytes": budget_bytes - peak,
    }


def _describe(entry: dict, budget_gib: float) -> str:
    return (
        f"{config_words(entry['config'])}: {entry['samples_per_s']:,.0f} samples/s "
        f"at {entry['peak_allocated_bytes'] / GIB:,.1f} GiB of {budget_gib:g}"
    )


def recommend(
    results: Iterable[dict],
    effective_batch: int,
    memory_budget_gib: float,
    model: str | None = None,
    device: str | None = None,
) -> dict:
    """The fastest measured configuration of ``effective_batch`` whose peak fits the budget.

    Returns ``fits``, ``best`` and ``runner_up`` (each id, config, samples_per_s,
    peak_allocated_bytes, margin_bytes, or None), ``closest`` (when nothing fits: the run
    at that effective batch needing the least memory), counts, and ``answer`` in words.
    Raises SelectionError when the runs mix models or devices and none was picked.
    """
    if effective_batch < 1:
        raise ValueError(f"effective batch must be >= 1, got {effective_batch}")
    if not memory_budget_gib > 0:
        raise ValueError(f"memory budget must be > 0 GiB, got {memory_budget_gib}")
    runs = select_runs(results, model, device)
    budget = memory_budget_gib * GIB
    at_batch = [r for r in runs if r["metrics"].get("effective_batch") == effective_batch]
    candidates = measured(at_batch)
    fitting = sorted((r for r in candidates if _peak(r) <= budget), key=lambda r: (-_throughput(r), _peak(r)))
    answer = {
        "fits": bool(fitting),
        "effective_batch": effective_batch,
        "memory_budget_bytes": budget,
        "best": _entry(fitting[0], budget) if fitting else None,
        "runner_up": _entry(fitting[1], budget) if len(fitting) > 1 else None,
        "closest": None,
        "considered": len(candidates),
        "over_budget": len(candidates) - len(fitting),
        "failed": sum(r["status"] != "ok" for r in at_batch),
    }
    if fitting:
        best = answer["best"]
        words = f"Best: {_describe(best, memory_budget_gib)}."
        if answer["runner_up"]:
            runner = answer["runner_up"]
            gain = best["samples_per_s"] / runner["samples_per_s"] - 1 if runner["samples_per_s"] else 0.0
            words += f" Runner-up: {_describe(runner, memory_budget_gib)} ({gain:.0%} slower)."
        answer["answer"] = words
        return answer
    if candidates:
        closest = min(candidates, key=_peak)
        answer["closest"] = _entry(closest, budget)
        answer["answer"] = (
            f"Nothing measured at effective batch {effective_batch} fits {memory_budget_gib:g} GiB. "
            f"Closest: {_describe(answer['closest'], memory_budget_gib)}, "
            f"{(_peak(closest) - budget) / GIB:,.2f} GiB over."
        )
    else:
        available = sorted({r["metrics"]["effective_batch"] for r in measured(runs)})
        answer["answer"] = (
            f"Nothing fits: no successful run at effective batch {effective_batch}"
            + (f" (measured: {', '.join(map(str, available))})." if available else ".")
        )
    return answer


def _variant(config: dict) -> tuple:
    """The settings a candidate shares with its smaller-micro-batch siblings."""
    return (config["precision"], config["ckpt"], config.get("k", 2) if config["ckpt"] == "every-k" else None, config["optimizer"])


def missing_candidates(
    results: Iterable[dict],
    effective_batch: int,
    memory_budget_gib: float,
    model: str | None = None,
    device: str | None = None,
) -> list[BenchConfig]:
    """Configurations the recommendation depends on that were never measured.

    The candidate space is every micro-batch dividing ``effective_batch`` (accum = N / batch)
    × every (precision, checkpointing, optimizer) combination already measured for this model:
    the dimensions the user chose to explore. A candidate is left out when it was run (any
    status but cancelled), or when the same settings at a smaller-or-equal micro-batch ran
    out of memory or exceeded the budget (memory grows with the micro-batch).
    Other fields (model, overrides, steps, device, ...) come from the newest run.
    """
    runs = select_runs(results, model, device)
    if not runs:
        return []
    budget = memory_budget_gib * GIB
    template = max(runs, key=lambda r: r["created_at"])["config"]
    variants = {_variant(r["config"]): r["config"] for r in runs}
    done = {(r["config"]["batch"], r["config"]["accum"], _variant(r["config"])) for r in runs if r["status"] != "cancelled"}
    too_big: dict[tuple, int] = {}  # variant -> smallest micro-batch known not to fit
    for r in runs:
        peak = _peak(r)
        if r["status"] == "oom" or (r["status"] == "ok" and peak is not None and peak > budget):
            v = _variant(r["config"])
            too_big[v] = min(too_big.get(v, r["config"]["batch"]), r["config"]["batch"])
    out = []
    for variant, source in sorted(variants.items(), key=lambda kv: repr(kv[0])):
        for batch in (b for b in range(1, effective_batch + 1) if effective_batch % b == 0):
            accum = effective_batch // batch
            if (batch, accum, variant) in done or batch >= too_big.get(variant, effective_batch + 1):
                continue
            out.append(
                BenchConfig.from_dict(
                    template
                    | {
                        "batch": batch,
                        "accum": accum,
                        "precision": source["precision"],
                        "ckpt": source["ckpt"],
                        "k": source.get("k", template.get("k", 2)),
                        "optimizer": source["optimizer"],
                    }
                )
            )
    return out
