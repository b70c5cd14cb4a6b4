"""The result schema (v1) as types: ``Result`` with its ``Metrics``, ``Env`` and
``MemoryBreakdown``; building, classifying failures, reading and writing.

One result is one JSON object; many results are JSON Lines. The dataclasses below are the
schema: ``Result.from_dict`` checks every field against its declared type and range, so a
reader accepts exactly one schema version and rejects anything else (wrong types,
non-finite or out-of-range numbers, missing keys) with a message that names the file, the
line, the field and the value. A dashboard never draws a chart from a half-understood file.

Files written by earlier v1 builds keep reading: metric keys added since (``grad_rel_diff``,
``allocator_retries``, ``nvml_device_used_bytes``, ``rank_peak_bytes``, ``compile_s``...) default to null
when absent.
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import math
import os
import tempfile
import typing
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Iterable, Literal

from .config import BenchConfig, ConfigError, memory_limit_bytes
from .stats import Summary

SCHEMA = "tradeoff-lab/result/v1"
Status = Literal["ok", "oom", "error", "timeout", "cancelled"]
STATUSES: tuple[str, ...] = typing.get_args(Status)
Origin = Literal["here", "imported", "demo"]
ORIGINS: tuple[str, ...] = typing.get_args(Origin)
ORIGIN_WORDS = {"here": "measured here", "imported": "imported", "demo": "demo data"}
FAILED_STATUSES = STATUSES[1:]
PHASES = ("step_ms", "forward_ms", "backward_ms", "optimizer_ms")
# The config fields every reader relies on; others may be absent in results written by a
# build with fewer fields, and take their defaults.
REQUIRED_CONFIG_KEYS = ("model", "batch", "accum", "precision", "ckpt", "optimizer", "device")
# Integers beyond int64 cannot be stored in SQLite or drawn exactly.
_INT_LIMIT = 2**63 - 1
_MAX_TEXT = 20_000
_MAX_RANKS = 100_000

# CPU allocators and the CUDA caching allocator report OOM as plain RuntimeErrors with these
# phrases (glibc "can't allocate memory" surfaces through DefaultCPUAllocator; a failed C++
# `new` inside an operator reaches Python as "std::bad_alloc").
_OOM_PHRASES = ("out of memory", "can't allocate memory", "defaultcpuallocator", "std::bad_alloc")
_MAX_ERROR_CHARS = 4000


class ResultFormatError(ValueError):
    """A results file or object that is not a valid v1 result; the message names the source."""


# --------------------------------------------------------------------------- the types
@dataclass(frozen=True)
class MemoryBreakdown:
    """Bytes per role at the peak of the instrumented step."""

    params: int
    grads: int
    optimizer: int
    activations: int
    other: int

    @property
    def total(self) -> int:
        """The five parts together: the instrumented step's peak."""
        return sum(getattr(self, key) for key in BREAKDOWN_KEYS)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


BREAKDOWN_KEYS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(MemoryBreakdown))


@dataclass(frozen=True)
class Metrics:
    """Every metric of a run; None where unknown (all but ``effective_batch`` for a failed run)."""

    effective_batch: int
    step_ms: Summary | None = None
    forward_ms: Summary | None = None
    backward_ms: Summary | None = None
    optimizer_ms: Summary | None = None
    samples_per_s: float | None = None
    tokens_per_s: float | None = None
    peak_allocated_bytes: int | None = None
    peak_reserved_bytes: int | None = None
    nvml_used_bytes: int | None = None
    nvml_device_used_bytes: int | None = None
    memory_breakdown_bytes: MemoryBreakdown | None = None
    flops_per_step: int | None = None
    hw_flops_per_step: int | None = None
    mfu: float | None = None
    loss_scale: float | None = None
    skipped_steps: int | None = None
    energy_j_per_sample: float | None = None
    grad_rel_diff: float | None = None
    allocator_retries: int | None = None
    # A data-parallel run: every rank's peak, in rank order (the other memory figures are
    # the rank with the largest peak's); None for one process.
    rank_peak_bytes: list[int] | None = None
    compile_s: float | None = None  # torch.compile's compile time (warm-up); None for eager runs

    def phase(self, key: str) -> Summary | None:
        """The Summary of a phase key (``step_ms``, ``backward_ms``...)."""
        return getattr(self, key)

    def to_dict(self) -> dict:
        return {key: _plain(getattr(self, key)) for key in METRIC_KEYS}


METRIC_KEYS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(Metrics))
# Keys added to v1 after its first files were written: absent in those files, read as null.
_LATER_METRIC_KEYS = ("grad_rel_diff", "allocator_retries", "nvml_device_used_bytes", "rank_peak_bytes", "compile_s")


@dataclass(frozen=True)
class Env:
    """The environment a result was measured in, with the fingerprint that tells one machine
    and software stack from another (``host_id`` is a hash, never the machine's own id)."""

    device_type: str | None = None
    device_name: str | None = None
    capacity_bytes: int | None = None
    torch: str | None = None
    cuda: str | None = None
    driver: str | None = None
    python: str | None = None
    cpu: str | None = None
    host_id: str | None = None
    gpu_uuid: str | None = None
    cpu_threads: int | None = None
    alloc_conf: str | None = None
    load_avg: float | None = None  # the machine's 1-minute load when a CPU run started (not identity)

    @property
    def label(self) -> str:
        """The device in words: its name, else its type."""
        return self.device_name or self.device_type or "unknown device"

    @property
    def fingerprint(self) -> tuple:
        """What makes two runs' numbers comparable: the device (its GPU's UUID, else the host),
        the CPU threads, the software versions and the allocator settings."""
        return (self.device_type, self.device_name, self.gpu_uuid or self.host_id, self.cpu_threads, self.torch,
                self.cuda, self.driver, self.alloc_conf)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


ENV_KEYS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(Env))
_ENV_KINDS = {key: next(a for a in typing.get_args(hint) if a is not type(None))
              for key, hint in typing.get_type_hints(Env).items()}


@dataclass(frozen=True)
class Checkpointed:
    """What a policy wrapped: how many of the blocks found, their classes, the share of the
    model's parameters inside the wrapped blocks, how the blocks were found, their paths."""

    wrapped: int
    found: int
    classes: tuple[str, ...]
    param_share: float
    source: str
    paths: tuple[str, ...]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self) | {"classes": list(self.classes), "paths": list(self.paths)}

    @classmethod
    def from_dict(cls, data) -> "Checkpointed":
        """Decode (and check) the stored form; ``_Invalid`` naming the field otherwise."""
        if not isinstance(data, dict):
            raise _Invalid("checkpointed must be an object or null")
        share = _number(data.get("param_share"), "checkpointed.param_share")
        if not 0 <= share <= 1:
            raise _Invalid(f"checkpointed.param_share must be a fraction, got {share!r}")
        lists = {}
        for key in ("classes", "paths"):
            items = data.get(key)
            if not isinstance(items, list) or len(items) > 100_000:
                raise _Invalid(f"checkpointed.{key} must be a list of strings")
            lists[key] = tuple(_text(item, f"checkpointed.{key}", nullable=False, limit=500) for item in items)
        return cls(wrapped=_integer(data.get("wrapped"), "checkpointed.wrapped"),
                   found=_integer(data.get("found"), "checkpointed.found"), param_share=share,
                   source=_text(data.get("source"), "checkpointed.source", nullable=False, limit=1000), **lists)

    def warning(self) -> str | None:
        """A sentence when checkpointing reaches less than half of the model's parameters."""
        if self.param_share >= 0.5:
            return None
        return (f"checkpointing wraps {self.wrapped} of {self.found} blocks ({', '.join(self.classes)}) holding "
                f"{self.param_share:.0%} of the parameters: most of the model keeps its activations "
                "(name the blocks with --blocks)")


@dataclass(frozen=True)
class Result:
    """One benchmark run: its configuration, environment, status and metrics."""

    id: str
    status: Status
    created_at: str
    config: BenchConfig
    env: Env
    metrics: Metrics
    error: str | None = None
    samples: dict[str, list[float]] | None = None
    warnings: tuple[str, ...] = ()
    sweep_id: str | None = None
    checkpointed: Checkpointed | None = None  # which blocks checkpointing wrapped (ok runs with it)
    origin: Origin = "here"  # measured by this installation, imported from a file, or the demo data

    @classmethod
    def new(cls, config: BenchConfig, status: str, env: Env | dict, metrics: Metrics | None = None,
            samples: dict | None = None, error: str | None = None, warnings: Iterable[str] = (),
            sweep_id: str | None = None, checkpointed: Checkpointed | None = None) -> "Result":
        """A result with a fresh id and UTC timestamp.

        For a failed status every metric is None except ``effective_batch`` and ``samples``
        is None, whatever was passed: a failed run's numbers are unknown, not zero.
        Non-finite numbers become None (JSON has no NaN).
        """
        if status not in STATUSES:
            raise ValueError(f"status {status!r} is not one of {', '.join(STATUSES)}")
        if status == "ok" and metrics is not None:
            metrics = dataclasses.replace(_finite_metrics(metrics), effective_batch=config.effective_batch)
        else:
            metrics, samples = Metrics(effective_batch=config.effective_batch), None
        return cls(
            id=uuid.uuid4().hex,
            status=status,
            created_at=datetime.now(timezone.utc).isoformat(),
            config=config,
            env=env if isinstance(env, Env) else Env(**{k: env.get(k) for k in ENV_KEYS}),
            metrics=metrics,
            error=error,
            samples={key: list(values) for key, values in samples.items()} if samples else None,
            warnings=tuple(warnings),
            sweep_id=sweep_id,
            checkpointed=checkpointed if status == "ok" else None,
        )

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def environment(self) -> tuple:
        """What must match for two runs' numbers to be compared or decided on together: where
        they come from and the environment's fingerprint."""
        return (self.origin, *self.env.fingerprint)

    @property
    def noisy(self) -> bool:
        """Whether the step time varied between steps past the noise threshold (IQR/median)."""
        return self.metrics.step_ms is not None and self.metrics.step_ms.noisy

    @property
    def origin_words(self) -> str:
        """Where the run comes from, in words: measured here, imported, demo data."""
        return ORIGIN_WORDS[self.origin]

    @property
    def environment_id(self) -> str:
        """A short, stable name for ``environment`` (``--env ID``, the pages' pickers)."""
        return hashlib.sha1(repr(self.environment).encode()).hexdigest()[:8]

    @property
    def environment_words(self) -> str:
        """The environment in words: device, versions, where the run comes from."""
        e = self.env
        parts = [e.label]
        if e.cpu_threads:
            parts.append(f"{e.cpu_threads} threads")
        parts.append(f"torch {e.torch or '?'}" + (f", CUDA {e.cuda}" if e.cuda else ""))
        if e.alloc_conf:
            parts.append(e.alloc_conf)
        return f"{', '.join(parts)} · {self.origin_words} [{self.environment_id}]"

    @property
    def memory_limit_bytes(self) -> float | None:
        """The memory this run was allowed: its memory cap, else its device's capacity."""
        return memory_limit_bytes(self.config.memory_cap_gib, self.env.capacity_bytes)

    def replace(self, **changes: Any) -> "Result":
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """The v1 JSON object."""
        return {
            "schema": SCHEMA,
            "id": self.id,
            "status": self.status,
            "error": self.error,
            "created_at": self.created_at,
            "config": self.config.to_dict(),
            "env": self.env.to_dict(),
            "metrics": self.metrics.to_dict(),
            "samples": None if self.samples is None else {k: list(v) for k, v in self.samples.items()},
            "sweep_id": self.sweep_id,
            "warnings": list(self.warnings),
            "checkpointed": None if self.checkpointed is None else self.checkpointed.to_dict(),
            "origin": self.origin,
        }

    def to_json(self) -> str:
        """One JSON line (no newline)."""
        return json.dumps(self.to_dict(), allow_nan=False, separators=(",", ":"))

    @classmethod
    def from_dict(cls, obj: Any, source: str = "result") -> "Result":
        """The Result of a v1 JSON object; ResultFormatError naming ``source``, the field and the
        problem for anything that is not exactly that."""
        try:
            return _decode_result(obj)
        except _Invalid as exc:
            raise ResultFormatError(f"{source}: {exc}") from None


# --------------------------------------------------------------------------- checking
class _Invalid(ValueError):
    """One problem found while decoding, phrased without the source."""


def _plain(value):
    if isinstance(value, (Summary, MemoryBreakdown)):
        return value.to_dict()
    return value


def _finite_metrics(metrics: Metrics) -> Metrics:
    changes = {key: None for key in METRIC_KEYS
               if isinstance(value := getattr(metrics, key), float) and not math.isfinite(value)}
    return dataclasses.replace(metrics, **changes) if changes else metrics


def _text(value, where: str, nullable: bool = True, limit: int = _MAX_TEXT) -> str | None:
    if value is None and nullable:
        return None
    if not isinstance(value, str):
        raise _Invalid(f"{where} must be a string{' or null' if nullable else ''}, got {_kind(value)}")
    if len(value) > limit:
        raise _Invalid(f"{where} is longer than {limit} characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise _Invalid(f"{where} holds a lone surrogate (not text)") from None
    return value


def _kind(value) -> str:
    return "null" if value is None else type(value).__name__


def _integer(value, where: str, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _Invalid(f"{where} must be an integer, got {_kind(value)}")
    if not minimum <= value <= _INT_LIMIT:
        shown = value if abs(value) < 10**30 else f"an integer of {len(str(abs(value)))} digits"
        raise _Invalid(f"{where} must be an integer from {minimum} to 2^63-1, got {shown}")
    return value


def _number(value, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _Invalid(f"{where} must be a number, got {_kind(value)}")
    if isinstance(value, int) and abs(value) > _INT_LIMIT:
        raise _Invalid(f"{where} is out of range ({len(str(abs(value)))} digits)")
    if not math.isfinite(value):
        raise _Invalid(f"{where} must be a finite number, got {value!r}")
    return float(value)


def _summary(value, where: str) -> Summary:
    if not isinstance(value, dict) or any(key not in value for key in ("median", "p10", "p90", "iqr_rel")):
        raise _Invalid(f"{where} must be an object with median, p10, p90, iqr_rel")
    numbers = {key: _number(value[key], f"{where}.{key}") for key in ("median", "p10", "p90", "iqr_rel")}
    if any(v < 0 for v in numbers.values()):
        raise _Invalid(f"{where} holds a negative time")
    return Summary(**numbers)


def _breakdown(value, where: str) -> MemoryBreakdown:
    if not isinstance(value, dict) or any(key not in value for key in BREAKDOWN_KEYS):
        raise _Invalid(f"{where} must be an object with {', '.join(BREAKDOWN_KEYS)}")
    return MemoryBreakdown(**{key: _integer(value[key], f"{where}.{key}") for key in BREAKDOWN_KEYS})


# Each metric's type without its None, resolved once: decoding runs for every stored row.
_METRIC_KINDS = {key: next(a for a in typing.get_args(hint) if a is not type(None))
                 for key, hint in typing.get_type_hints(Metrics).items() if key != "effective_batch"}


def _metric(key: str, value):
    if value is None:
        return None
    kind = _METRIC_KINDS[key]
    where = f"metrics.{key}"
    if kind is Summary:
        return _summary(value, where)
    if kind is MemoryBreakdown:
        return _breakdown(value, where)
    if kind is int:
        return _integer(value, where)
    if typing.get_origin(kind) is list:
        if not isinstance(value, list) or not value or len(value) > _MAX_RANKS:
            raise _Invalid(f"{where} must be a list of 1 to {_MAX_RANKS} integers or null")
        return [_integer(item, f"{where}[{i}]") for i, item in enumerate(value)]
    number = _number(value, where)
    if number < 0:
        raise _Invalid(f"{where} must not be negative, got {number!r}")
    return number


def _decode_metrics(metrics, status: str) -> Metrics:
    if not isinstance(metrics, dict):
        raise _Invalid("metrics must be an object")
    missing = [key for key in METRIC_KEYS if key not in metrics and key not in _LATER_METRIC_KEYS]
    if missing:
        raise _Invalid(f"metrics is missing {', '.join(missing)}")
    values = {key: _metric(key, metrics.get(key)) for key in METRIC_KEYS if key != "effective_batch"}
    effective = _integer(metrics["effective_batch"], "metrics.effective_batch", minimum=1)
    if status == "ok":
        for phase in PHASES:
            if values[phase] is None:
                raise _Invalid(f"metrics.{phase} must be an object for an ok result")
    else:
        filled = [key for key, value in values.items() if value is not None]
        if filled:
            raise _Invalid(f"a {status!r} result must have null metrics, but {', '.join(filled)} are set")
    return Metrics(effective_batch=effective, **values)


def _decode_samples(samples, status: str) -> dict | None:
    if status != "ok":
        return None
    if not isinstance(samples, dict):
        raise _Invalid("samples must be an object for an ok result")
    out = {}
    for key, values in samples.items():
        _text(key, "samples key", nullable=False, limit=100)
        if not isinstance(values, list):
            raise _Invalid(f"samples.{key} must be a list of numbers")
        out[key] = [_number(v, f"samples.{key}") for v in values]
    return out


def _decode_config(config) -> BenchConfig:
    if not isinstance(config, dict):
        raise _Invalid("config must be an object")
    missing = [key for key in REQUIRED_CONFIG_KEYS if key not in config]
    if missing:
        raise _Invalid(f"config is missing {', '.join(missing)}")
    try:
        return BenchConfig.from_dict(config)
    except ConfigError as exc:
        raise _Invalid(f"config.{exc}") from None
    except TypeError as exc:  # e.g. an unhashable value where a choice is expected
        raise _Invalid(f"config: {exc}") from None


def _decode_env(env) -> Env:
    if not isinstance(env, dict):
        raise _Invalid("env must be an object")
    values = {}
    for key in ENV_KEYS:
        value, where = env.get(key), f"env.{key}"
        kind = _ENV_KINDS[key]
        values[key] = None if value is None else _integer(value, where) if kind is int else \
            _number(value, where) if kind is float else _text(value, where, limit=500)
    return Env(**values)


def _decode_result(obj) -> Result:
    if not isinstance(obj, dict):
        raise _Invalid(f"expected a result object, got {_kind(obj)}")
    schema = obj.get("schema")
    if schema != SCHEMA:
        raise _Invalid(f"unsupported schema {_short(schema)}; this reader reads {SCHEMA!r}")
    missing = [key for key in ("id", "status", "error", "created_at", "config", "env", "metrics", "samples")
               if key not in obj]
    if missing:
        raise _Invalid(f"missing key(s): {', '.join(missing)}")
    identifier = _text(obj["id"], "id", nullable=False, limit=200)
    if not identifier:
        raise _Invalid("id must be a non-empty string")
    status = obj["status"]
    if status not in STATUSES:
        raise _Invalid(f"status {_short(status)} is not one of {', '.join(STATUSES)}")
    created_at = _text(obj["created_at"], "created_at", nullable=False, limit=100)
    try:
        datetime.fromisoformat(created_at)
    except ValueError:
        raise _Invalid(f"created_at {created_at!r} is not ISO-8601") from None
    error = _text(obj["error"], "error")
    if status != "ok" and error is None:
        raise _Invalid(f"a {status!r} result needs an error message (string)")
    warnings = obj.get("warnings")
    if warnings is not None and not isinstance(warnings, list):
        raise _Invalid("warnings must be a list of strings")
    return Result(
        id=identifier,
        status=status,
        created_at=created_at,
        config=_decode_config(obj["config"]),
        env=_decode_env(obj["env"]),
        metrics=_decode_metrics(obj["metrics"], status),
        error=error,
        samples=_decode_samples(obj["samples"], status),
        warnings=tuple(_text(w, "warnings", nullable=False) for w in warnings or ()),
        sweep_id=_text(obj.get("sweep_id"), "sweep_id", limit=200),
        checkpointed=None if obj.get("checkpointed") is None else Checkpointed.from_dict(obj["checkpointed"]),
        origin=_origin(obj.get("origin", "here")),
    )


def _origin(value) -> str:
    if value not in ORIGINS:
        raise _Invalid(f"origin {_short(value)} is not one of {', '.join(ORIGINS)}")
    return value


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


# --------------------------------------------------------------------------- failures
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


# --------------------------------------------------------------------------- reading / writing
def _loads(line: str):
    # JSON has no NaN or Infinity; Python's reader accepts them (and 1e400 as inf) unless told.
    def reject(name: str):
        raise ValueError(f"{name} is not a JSON number")

    value = json.loads(line, parse_constant=reject)
    return value


def _load_one(text: str, where: str):
    try:
        return _loads(text)
    except json.JSONDecodeError as exc:
        raise ResultFormatError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
    except RecursionError:
        raise ResultFormatError(f"{where}: nested too deeply to be a result") from None
    except ValueError as exc:
        raise ResultFormatError(f"{where}: not valid JSON ({exc})") from None


class ResultList(list):
    """Results read from a file (a plain list of ``Result``), with ``notes``: sentences about
    what the reader skipped (a torn last line), for the caller to show as warnings."""

    def __init__(self, results: Iterable[Result] = (), notes: Iterable[str] = ()):
        super().__init__(results)
        self.notes: tuple[str, ...] = tuple(notes)


def parse_results(text: str, source: str) -> ResultList:
    """Results from JSON Lines text (also one JSON object or a JSON list); validated.

    Raises ResultFormatError naming ``source`` (and the line for JSON Lines) and the problem.
    Lines are split on "\\n" only: a JSON string may hold U+2028, which ``splitlines`` would
    take for a line break. A last line without its newline that starts an object but is
    not valid JSON is a write cut short (a full disk, a killed writer): it is skipped with a
    note in ``notes``, so one torn line does not make the file unreadable. A bad line
    anywhere else is an error.
    """
    stripped = text.strip()
    if not stripped:
        return ResultList()
    if stripped[0] == "[" or (stripped[0] == "{" and "\n" in stripped):
        # A whole-document JSON value: a list, or one pretty-printed object. (A one-line
        # object is read as JSON Lines below, so its errors name line 1.)
        try:
            whole = _loads(stripped)
        except (ValueError, RecursionError):
            whole = None  # not one document: fall through to JSON Lines
        if isinstance(whole, list):
            return ResultList(Result.from_dict(item, f"{source}: item {i + 1}") for i, item in enumerate(whole))
        if whole is not None:
            return ResultList([Result.from_dict(whole, source)])
    lines = text.split("\n")
    notes = []
    if lines[-1].strip() and _is_torn(lines[-1]):
        notes.append(f"{source}: line {len(lines)} was cut short (no newline, not complete JSON: "
                     f"a write that did not finish) and was skipped")
        lines.pop()
    results = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{source}: line {number}"
        results.append(Result.from_dict(_load_one(line, where), where))
    return ResultList(results, notes)


def _is_torn(last_line: str) -> bool:
    """Whether the text after a file's last newline is an unfinished result line: it starts
    like one (every result line is an object) but is not complete JSON."""
    if not last_line.lstrip().startswith("{"):
        return False
    try:
        _loads(last_line)
    except json.JSONDecodeError:
        return True
    except (ValueError, RecursionError):
        return False  # complete, but not a result: an error for the caller to report
    return False


# SQLite database files start with this header; a results reader says so instead of
# reporting binary garbage.
SQLITE_MAGIC = b"SQLite format 3\x00"


def decode_results(data: bytes, source: str) -> ResultList:
    """Validated results from the bytes of a results file (JSON Lines, a JSON object or list)
    named ``source``; ResultFormatError naming it for anything else (a SQLite database,
    non-UTF-8 bytes, invalid content)."""
    if data.startswith(SQLITE_MAGIC):
        raise ResultFormatError(f"{source}: a SQLite database of runs, not a results file")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ResultFormatError(f"{source}: not UTF-8 text (byte {exc.start})") from None
    return parse_results(text, source)


def read_results(path: str | os.PathLike) -> ResultList:
    """Validated results from a JSON Lines file (or a JSON object/list file).

    Raises ResultFormatError for content problems and OSError if the file cannot be read.
    """
    with open(path, "rb") as f:
        raw = f.read()
    return decode_results(raw, os.fspath(path))


def dumps_jsonl(results: Iterable[Result]) -> str:
    """JSON Lines text, one result per line."""
    return "".join(result.to_json() + "\n" for result in results)


def write_jsonl(path: str | os.PathLike, results: Iterable[Result], append: bool = True) -> str | None:
    """Write results as JSON Lines (appending by default); creates the parent directory.

    Never leaves a half-written line: a new file is written to a temporary file and renamed
    into place; an append is one ``write`` of whole lines, and if the disk fills part-way
    the file is cut back to its previous size before the error propagates. Appending to a
    file whose last line is torn (an earlier write cut short) first drops that fragment, so
    the new lines start on a line of their own; the returned note says so (else None).
    Raises OSError naming ``path`` when the file cannot be written.
    """
    data = dumps_jsonl(results).encode("utf-8")
    path = os.fspath(path)
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    if not append:
        _replace_atomically(path, data)
        return None
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        note = _drop_torn_tail(fd, path)
        start = os.fstat(fd).st_size
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                if written == 0:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                view = view[written:]
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, start)  # take back a partial line: the file stays readable
            raise OSError(exc.errno, exc.strerror, path) from None
    finally:
        os.close(fd)
    return note


def _drop_torn_tail(fd: int, path: str) -> str | None:
    """Cut a torn last line (no newline, an unfinished object) off the file open at ``fd``;
    any other last line that only lacks its newline gets one. Returns a note, or None."""
    size = os.fstat(fd).st_size
    if size == 0 or os.pread(fd, 1, size - 1) == b"\n":
        return None
    end = size  # find the start of the last line, reading backwards in blocks
    while end > 0:
        begin = max(0, end - 65536)
        newline = os.pread(fd, end - begin, begin).rfind(b"\n")
        if newline >= 0:
            end = begin + newline + 1
            break
        end = begin
    tail = os.pread(fd, size - end, end).decode("utf-8", errors="replace")
    if not _is_torn(tail):
        os.write(fd, b"\n")
        return None
    os.ftruncate(fd, end)
    return f"{path}: dropped a torn last line ({size - end} bytes of a write that did not finish) before appending"


def _replace_atomically(path: str, data: bytes) -> None:
    """Write ``path`` whole or not at all: a temporary file beside it, renamed into place."""
    fd, temp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=".tmp-", suffix=".jsonl")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
