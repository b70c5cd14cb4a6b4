"""Pure table builders: results -> pandas DataFrames for st.dataframe, CSV export and diffs."""
from __future__ import annotations

import pandas as pd

from engine.config import DESCRIBED_FIELDS, GIB, BenchConfig, parallel_words
from engine.results import Result

from .charts.runs import field_value

# Column name -> how to read it from a result; units live in the names, as in the schema.
_COLUMNS = {
    "created": lambda r: pd.Timestamp(r.created_at),
    "status": lambda r: r.status,
    "model": lambda r: r.config.model,
    "batch": lambda r: r.config.batch,
    "accum": lambda r: r.config.accum,
    "effective batch": lambda r: r.metrics.effective_batch,
    "precision": lambda r: r.config.precision,
    "ckpt": lambda r: field_value(r, "ckpt"),
    # The described fields (optimizer, attention...), one column each, from their declaration.
    **{f.name.replace("_", " "): (lambda r, name=f.name: getattr(r.config, name)) for f in DESCRIBED_FIELDS},
    "data parallel": lambda r: (parallel_words(r.config.parallel, r.config.nproc, r.config.reshard)
                                if r.config.distributed else None),
    "device": lambda r: r.env.label,
    "environment": lambda r: r.environment_words,
    "samples/s": lambda r: r.metrics.samples_per_s,
    "tokens/s": lambda r: r.metrics.tokens_per_s,
    "step ms": lambda r: _median(r, "step_ms"),
    "forward ms": lambda r: _median(r, "forward_ms"),
    "backward ms": lambda r: _median(r, "backward_ms"),
    "optimizer ms": lambda r: _median(r, "optimizer_ms"),
    "step noise %": lambda r: None if r.metrics.step_ms is None else _percent(r.metrics.step_ms.iqr_rel),
    "peak GiB": lambda r: _gib(r.metrics.peak_allocated_bytes),
    "MFU %": lambda r: _percent(r.metrics.mfu),
    "compile s": lambda r: r.metrics.compile_s,
    "sweep": lambda r: (r.sweep_id or "")[:8],
    "error": lambda r: r.error or "",
    "id": lambda r: r.id,
}
RUN_COLUMNS = tuple(_COLUMNS)
# A sweep's queue shows the noise beside the throughput, so a noisy row is not read as steady.
_QUEUE_METRICS = ("samples/s", "step noise %", "peak GiB")
METRIC_COLUMNS = ("samples/s", "tokens/s", "step ms", "forward ms", "backward ms", "optimizer ms", "step noise %",
                  "peak GiB", "MFU %", "compile s")


# Engine keys that reach a table, in words: one mapping, so no page shows "fitted_max_batch".
COLUMN_WORDS = {
    "capacity": "memory",
    "fitted_max_batch": "largest batch (fit)",
    "analytic_max_batch": "largest batch (analytic)",
    "name": "check",
    "status": "result",
    "expected": "expected",
    "measured": "measured",
    "reason": "why",
    "setting": "setting",
    "metric": "metric",
}


def in_words(rows: list[dict], drop: tuple[str, ...] = ()) -> pd.DataFrame:
    """Engine rows as a table with headers in words (``COLUMN_WORDS``) and a dash for every
    unknown value, never "None"; columns in ``drop`` (raw byte counts) left out."""
    frame = pd.DataFrame(rows).drop(columns=[c for c in drop if rows and c in rows[0]])
    return frame.rename(columns=COLUMN_WORDS).astype(object).where(frame.notna().values, "–")


def _median(result: Result, key: str) -> float | None:
    summary = result.metrics.phase(key)
    return None if summary is None else summary.median


def _percent(value: float | None) -> float | None:
    return None if value is None else 100.0 * value


def _gib(value: int | None) -> float | None:
    return None if value is None else value / GIB


def runs_frame(results: list[Result]) -> pd.DataFrame:
    """One row per run with status, config and key metrics; failed runs' metrics are empty (NaN)."""
    frame = pd.DataFrame([{name: read(r) for name, read in _COLUMNS.items()} for r in results], columns=RUN_COLUMNS)
    # Numbers stay numbers (sortable, NaN where unknown) even in a column that is all unknown.
    return frame.astype({name: "float64" for name in METRIC_COLUMNS})


def _flatten(value, prefix: str = "") -> dict:
    """Nested dicts to dotted keys: {"step_ms": {"median": 1}} -> {"step_ms.median": 1}."""
    if isinstance(value, dict):
        flat = {}
        for key, item in value.items():
            flat.update(_flatten(item, f"{prefix}.{key}" if prefix else key))
        return flat
    return {prefix: value}


def diff_runs(a: Result, b: Result) -> tuple[pd.DataFrame, pd.DataFrame]:
    """What changed from run ``a`` to run ``b``: (config and environment changes, metrics).

    The metrics table lists every numeric metric with both values and the relative change
    (b / a - 1), empty where a value is missing or ``a`` is zero.
    """
    settings_a, settings_b = ({**_flatten(r.config.to_dict(), "config"), **_flatten(r.env.to_dict(), "env"),
                               "origin": r.origin_words} for r in (a, b))
    changes = [
        {"setting": key, "A": str(settings_a.get(key)), "B": str(settings_b.get(key))}
        for key in sorted(set(settings_a) | set(settings_b))
        if settings_a.get(key) != settings_b.get(key)
    ]
    metrics_a, metrics_b = _flatten(a.metrics.to_dict()), _flatten(b.metrics.to_dict())
    rows = []
    for key in list(metrics_a) + [k for k in metrics_b if k not in metrics_a]:
        va, vb = metrics_a.get(key), metrics_b.get(key)
        numeric = all(v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)) for v in (va, vb))
        if not numeric or (va is None and vb is None):
            continue
        change = vb / va - 1 if va and vb is not None else None
        if key.endswith("_bytes") or "_bytes." in key:  # GiB in the UI, never a raw byte count
            key, va, vb = key.replace("_bytes", " (GiB)"), *(None if v is None else v / GIB for v in (va, vb))
        rows.append({"metric": key, "A": va, "B": vb, "change %": None if change is None else 100 * change})
    return (pd.DataFrame(changes, columns=["setting", "A", "B"]),
            pd.DataFrame(rows, columns=["metric", "A", "B", "change %"]))


def _results_by_config(configs: list[BenchConfig], results: list[Result]) -> dict[int, Result]:
    """Each result under the index of its config (equal configs in sweep order)."""
    left, matched = list(results), {}
    for index, config in enumerate(configs):
        found = next((j for j, result in enumerate(left) if result.config == config), None)
        if found is not None:
            matched[index] = left.pop(found)
    return matched


def queue_frame(configs: list[BenchConfig], results: list[Result], finished: bool,
                waiting_for_device: bool = False) -> pd.DataFrame:
    """A sweep's queue: one row per config with the fields that vary, its state and, once
    done, its status and key numbers. ``results`` come in finishing order (on a box with
    several GPUs, not the sweep's), each matched to its config; the first config not done
    is running (or waiting for the device)."""
    flat = [_flatten(c.to_dict()) for c in configs]
    varying = [k for k in flat[0] if len({repr(f.get(k)) for f in flat}) > 1] if len(flat) > 1 else []
    names = [k.removeprefix("overrides.") for k in varying]
    done = _results_by_config(configs, results)
    first_open = next((i for i in range(len(configs)) if i not in done), None)
    rows = []
    for i, fields in enumerate(flat):
        row = {"#": i + 1, **{name: fields.get(k) for name, k in zip(names, varying)}}
        if i in done:
            result = done[i]
            row.update(state="done", status=result.status, **{name: _COLUMNS[name](result) for name in _QUEUE_METRICS})
        elif i == first_open and not finished:
            row["state"] = "waiting for the device" if waiting_for_device else "running"
        else:
            row["state"] = "not run" if finished else "waiting"
        rows.append(row)
    return pd.DataFrame(rows, columns=["#", *names, "state", "status", *_QUEUE_METRICS])
