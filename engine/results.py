"""The result schema (v1): building, classifying, validating, reading and writing results.

One result is one JSON object (see ARCHITECTURE.md); many results are JSON Lines. Readers
accept exactly one schema version and reject anything else with a message that names the
file (and line) and the problem, so a dashboard never draws a chart from a half-understood
file.
"""
from __future__ import annotations

import json
import math
import os
import uuid
from datetime import datetime, timezone
from typing import Iterable

from .config import BenchConfig

SCHEMA = "tradeoff-lab/result/v1"
STATUSES = ("ok", "oom", "error", "timeout", "cancelled")
FAILED_STATUSES = STATUSES[1:]
PHASES = ("step_ms", "forward_ms", "backward_ms", "optimizer_ms")
SUMMARY_KEYS = ("median", "p10", "p90", "iqr_rel")
METRIC_KEYS = (
    "effective_batch",
    *PHASES,
    "samples_per_s",
    "tokens_per_s",
    "peak_allocated_bytes",
    "peak_reserved_bytes",
    "nvml_used_bytes",
    "memory_breakdown_bytes",
    "flops_per_step",
    "hw_flops_per_step",
    "mfu",
    "loss_scale",
    "skipped_steps",
    "energy_j_per_sample",
)
BREAKDOWN_KEYS = ("params", "grads", "optimizer", "activations", "other")
ENV_KEYS = ("device_type", "device_name", "capacity_bytes", "torch", "cuda", "driver", "python", "cpu")
REQUIRED_KEYS = ("schema", "id", "status", "error", "created_at", "config", "env", "metrics", "samples")
# The config fields every reader (show, dashboard) relies on; other fields may be absent in
# results written by a build with fewer fields.
REQUIRED_CONFIG_KEYS = ("model", "batch", "accum", "precision", "ckpt", "optimizer", "device")

# CPU allocators and the CUDA caching allocator report OOM as plain RuntimeErrors with these
# phrases (glibc "can't allocate memory" surfaces through DefaultCPUAllocator; a failed C++
# `new` inside an operator reaches Python as "std::bad_alloc").
_OOM_PHRASES = ("out of memory", "can't allocate memory", "defaultcpuallocator", "std::bad_alloc")
_MAX_ERROR_CHARS = 4000


class ResultFormatError(ValueError):
    """A results file or object that is not a valid v1 result; the message names the source."""


def _finite_or_none(value):
    """JSON has no NaN/Infinity: a non-finite number becomes null (an unknown) recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite_or_none(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_finite_or_none(item) for item in value]
    return value


def new_result(
    config: BenchConfig,
    status: str,
    env: dict,
    metrics: dict | None = None,
    samples: dict | None = None,
    error: str | None = None,
    warnings: list[str] | None = None,
    sweep_id: str | None = None,
) -> dict:
    """A complete v1 result dict with a fresh id and UTC timestamp.

    For a failed status every metric is None except ``effective_batch`` and ``samples`` is
    None, whatever was passed: a failed run's numbers are unknown, not zero. Missing metric
    keys of an ok run are filled with None so every result has the same keys.
    """
    if status not in STATUSES:
        raise ValueError(f"status {status!r} is not one of {', '.join(STATUSES)}")
    full_metrics = {key: None for key in METRIC_KEYS}
    if status == "ok":
        full_metrics.update(metrics or {})
    else:
        samples = None
    full_metrics["effective_batch"] = config.effective_batch
    result = {
        "schema": SCHEMA,
        "id": uuid.uuid4().hex,
        "status": status,
        "error": error,
        "created_at": datetime.now(timezone.utc).isoformat(),
        "config": config.to_dict(),
        "env": {key: env.get(key) for key in ENV_KEYS} | dict(env),
        "metrics": _finite_or_none(full_metrics),
        "samples": _finite_or_none(samples),
        "sweep_id": sweep_id,
        "warnings": list(warnings or []),
    }
    return result


def is_oom(exc: BaseException) -> bool:
    """Whether ``exc`` is an out-of-memory failure (CUDA/MPS allocator, CPU allocator, cap)."""
    if isinstance(exc, MemoryError):
        return True
    import torch  # lazily: classifying never needs torch unless an exception arrives

    if isinstance(exc, torch.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and any(p in str(exc).lower() for p in _OOM_PHRASES)


def classify_exception(exc: BaseException) -> tuple[str, str]:
    """``(status, message)`` for an exception raised by a benchmark: "oom" or "error"."""
    text = str(exc).strip()
    message = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    if len(message) > _MAX_ERROR_CHARS:
        message = message[: _MAX_ERROR_CHARS - 3] + "..."
    return ("oom" if is_oom(exc) else "error"), message


# ------------------------------------------------------------------------- validation
def _check_summary(value, where: str) -> None:
    if not isinstance(value, dict) or any(key not in value for key in SUMMARY_KEYS):
        raise ValueError(f"{where} must be an object with {', '.join(SUMMARY_KEYS)}")


def validate(obj, source: str) -> dict:
    """Return ``obj`` if it is a valid v1 result, else raise ResultFormatError naming ``source``."""

    def fail(problem: str):
        raise ResultFormatError(f"{source}: {problem}")

    if not isinstance(obj, dict):
        fail(f"expected a result object, got {type(obj).__name__}")
    schema = obj.get("schema")
    if schema != SCHEMA:
        fail(f"unsupported schema {schema!r}; this reader reads {SCHEMA!r}")
    missing = [key for key in REQUIRED_KEYS if key not in obj]
    if missing:
        fail(f"missing key(s): {', '.join(missing)}")
    if not isinstance(obj["id"], str) or not obj["id"]:
        fail("id must be a non-empty string")
    status = obj["status"]
    if status not in STATUSES:
        fail(f"status {status!r} is not one of {', '.join(STATUSES)}")
    if not isinstance(obj["created_at"], str):
        fail("created_at must be an ISO-8601 string")
    try:
        datetime.fromisoformat(obj["created_at"])
    except ValueError:
        fail(f"created_at {obj['created_at']!r} is not ISO-8601")
    config = obj["config"]
    if not isinstance(config, dict):
        fail("config must be an object")
    missing = [key for key in REQUIRED_CONFIG_KEYS if key not in config]
    if missing:
        fail(f"config is missing {', '.join(missing)}")
    if not isinstance(obj["env"], dict):
        fail("env must be an object")
    metrics = obj["metrics"]
    if not isinstance(metrics, dict):
        fail("metrics must be an object")
    missing = [key for key in METRIC_KEYS if key not in metrics]
    if missing:
        fail(f"metrics is missing {', '.join(missing)}")
    if obj.get("sweep_id") is not None and not isinstance(obj["sweep_id"], str):
        fail("sweep_id must be a string or null")
    warnings = obj.get("warnings")
    if warnings is not None and not (isinstance(warnings, list) and all(isinstance(w, str) for w in warnings)):
        fail("warnings must be a list of strings")
    if status == "ok":
        try:
            for phase in PHASES:
                _check_summary(metrics[phase], f"metrics.{phase}")
        except ValueError as exc:
            fail(str(exc))
        if not isinstance(obj["samples"], dict):
            fail("samples must be an object for an ok result")
    else:
        if not isinstance(obj["error"], str):
            fail(f"a {status!r} result needs an error message (string)")
        filled = [key for key in METRIC_KEYS if key != "effective_batch" and metrics[key] is not None]
        if filled:
            fail(f"a {status!r} result must have null metrics, but {', '.join(filled)} are set")
    return obj


# ------------------------------------------------------------------------- reading / writing
def parse_results(text: str, source: str) -> list[dict]:
    """Results from JSON Lines text (also one JSON object or a JSON list); validated.

    Raises ResultFormatError naming ``source`` (and the line for JSON Lines) and the problem.
    """
    stripped = text.strip()
    if not stripped:
        return []
    if stripped[0] == "[" or (stripped[0] == "{" and "\n" in stripped):
        # A whole-document JSON value: a list, or one pretty-printed object. (A one-line
        # object is read as JSON Lines below, so its errors name line 1.)
        try:
            whole = json.loads(stripped)
        except json.JSONDecodeError:
            whole = None  # not one document: fall through to JSON Lines
        if isinstance(whole, list):
            return [validate(item, f"{source}: item {i + 1}") for i, item in enumerate(whole)]
        if whole is not None:
            return [validate(whole, source)]
    results = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ResultFormatError(f"{source}: line {number}: not valid JSON ({exc.msg} at column {exc.colno})") from None
        results.append(validate(obj, f"{source}: line {number}"))
    return results


def read_results(path: str | os.PathLike) -> list[dict]:
    """Validated results from a JSON Lines file (or a JSON object/list file).

    Raises ResultFormatError for content problems and OSError if the file cannot be read.
    """
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ResultFormatError(f"{os.fspath(path)}: not UTF-8 text (byte {exc.start})") from None
    return parse_results(text, os.fspath(path))


def dumps_jsonl(results: Iterable[dict]) -> str:
    """JSON Lines text, one result per line, each validated first."""
    lines = []
    for i, result in enumerate(results):
        validate(result, f"result {i + 1} to write")
        lines.append(json.dumps(result, allow_nan=False, separators=(",", ":")) + "\n")
    return "".join(lines)


def write_jsonl(path: str | os.PathLike, results: Iterable[dict], append: bool = True) -> None:
    """Write results as JSON Lines (appending by default); creates the parent directory."""
    text = dumps_jsonl(results)
    parent = os.path.dirname(os.fspath(path))
    if parent:
        os.makedirs(parent, exist_ok=True)
    with open(path, "a" if append else "w", encoding="utf-8") as f:
        f.write(text)
