"""Sweeps: the cross product of value lists for config fields, run by an executor (``dispatch``)."""
from __future__ import annotations

import itertools
import math
import queue
import threading
import uuid
from typing import Callable

from . import limits
from .config import FIELD_NAMES, BenchConfig, ConfigError
from .dispatch import Executor, LocalExecutor
from .progress import ProgressFn
from .results import Result

# A sweep axis is a config field's name or, for one model dimension, this prefix and its key.
OVERRIDE_PREFIX = "overrides."
POLL_S = 0.05  # how soon a cancel is passed on while nothing arrives


def dimension_axis(key: str) -> str:
    """The sweep axis (a ``grid`` key of ``expand``) of model dimension ``key``: ``overrides.seq_len``."""
    return OVERRIDE_PREFIX + key


def axis_dimension(name: str) -> str | None:
    """The model dimension sweep axis ``name`` varies, None for a config field's axis."""
    return name[len(OVERRIDE_PREFIX):] if name.startswith(OVERRIDE_PREFIX) else None


def expand(base: dict, grid: dict[str, list], effective_batch: int | None = None) -> tuple[list[BenchConfig], list[str]]:
    """Configs for every combination of ``grid`` values on top of ``base``, and notes.

    ``base`` holds single values of BenchConfig fields; ``grid`` maps a field (or
    ``overrides.<dim>`` for one model dimension) to a list of values. With
    ``effective_batch`` N, accum is N / (batch × nproc) for each batch and a batch whose
    batch × nproc does not divide N is skipped with a note. Raises ConfigError for an unknown field, an empty
    list, a grid larger than this server's ``TRADEOFF_LAB_MAX_SWEEP`` (checked before any
    config is built), or any invalid resulting config.
    """
    for name, values in grid.items():
        dimension = axis_dimension(name)
        field = name if dimension is None else dimension
        if dimension is None and field not in FIELD_NAMES:
            raise ConfigError(name, values, f"a BenchConfig field: {', '.join(FIELD_NAMES)}")
        if not field or not isinstance(values, (list, tuple)) or not values:
            raise ConfigError(name, values, "a non-empty list of values")
    if effective_batch is not None:
        if isinstance(effective_batch, bool) or not isinstance(effective_batch, int) or effective_batch < 1:
            raise ConfigError("effective_batch", effective_batch, "an integer >= 1")
        if "accum" in grid or "accum" in base:
            raise ConfigError("accum", grid.get("accum", base.get("accum")), "no accum with an effective batch (accum = effective batch / batch)")
    # The size is the product of the list lengths, known before expanding: a grid of a
    # million configs is refused without building one.
    size, most = math.prod(len(values) for values in grid.values()), limits.max_sweep()
    if size > most:
        raise ConfigError("sweep", f"{size:,} configurations",
                          f"at most {most:,} configurations on this server ({limits.MAX_SWEEP.variable})")

    configs: list[BenchConfig] = []
    notes: list[str] = []
    names = list(grid)
    for combo in itertools.product(*(grid[name] for name in names)):
        fields = dict(base)
        overrides = dict(fields.get("overrides") or {})
        for name, value in zip(names, combo):
            if (dimension := axis_dimension(name)) is not None:
                overrides[dimension] = value
            else:
                fields[name] = value
        if overrides:
            fields["overrides"] = overrides
        if effective_batch is not None:
            batch = fields.get("batch", BenchConfig.batch)
            nproc = fields.get("nproc", BenchConfig.nproc)
            # Every rank runs batch × accum samples: the effective batch is batch × accum × nproc.
            per_step = batch * nproc if isinstance(nproc, int) and nproc >= 1 else batch
            if isinstance(batch, int) and batch >= 1 and effective_batch % per_step:
                note = (f"batch {batch} skipped: does not divide effective batch {effective_batch}" if nproc == 1 else
                        f"batch {batch} × {nproc} ranks skipped: does not divide effective batch {effective_batch}")
                if note not in notes:
                    notes.append(note)
                continue
            if isinstance(batch, int) and batch >= 1:
                fields["accum"] = effective_batch // per_step
        configs.append(BenchConfig(**fields))
    return configs, notes


def accumulation_notes(configs: list[BenchConfig]) -> list[str]:
    """One note per model in ``configs`` whose accumulated runs will not be one big batch
    (BatchNorm normalises each micro-batch on its own); said before the sweep starts so
    that a sweep at a fixed effective batch is not read as equivalent runs."""
    from .measure import batch_norm_warning
    from .predict import batch_norm_layers

    notes, seen = [], set()
    for config in configs:
        key = (config.model, tuple(sorted(config.overrides.items())))
        if config.accum <= 1 or key in seen:
            continue
        seen.add(key)
        if note := batch_norm_warning(list(batch_norm_layers(config) or ()), config.accum):
            notes.append(f"{config.model}: {note}")
    return notes


def run_sweep(
    configs: list[BenchConfig],
    progress: ProgressFn | None = None,
    on_result: Callable[[Result], None] | None = None,
    cancel: threading.Event | None = None,
    executor: Executor | None = None,
) -> list[Result]:
    """Run ``configs`` with ``executor`` (default ``LocalExecutor``: this machine's devices,
    one config per GPU at once, one config after another on a box with one device); returns
    one result per config run, in the order they finished.

    Failures (oom, error, timeout) are results and the sweep goes on; a cancel stops it: no
    config starts after it and the running ones end "cancelled". All results share one new
    ``sweep_id``. Progress events carry ``index`` (1-based config number) and ``count``
    (configs in the sweep). ``progress`` and ``on_result`` are called on the caller's thread,
    ``on_result`` with each result as it finishes (to store or print it); an exception from
    either (or an interrupt) stops the sweep, the running configs are cancelled, and it
    propagates once nothing runs any more.
    """
    sweep_id = uuid.uuid4().hex
    executor = executor or LocalExecutor()
    items: queue.SimpleQueue = queue.SimpleQueue()
    stop = threading.Event()
    finished = object()

    def emit(index: int, item) -> None:
        handled = threading.Event()
        items.put((index, item, handled))
        # A result is stored before its lane starts another config: a sweep stopped by a
        # failure to store it (a full disk) starts nothing more.
        while isinstance(item, Result) and not handled.wait(POLL_S) and not stop.is_set():
            pass

    def execute() -> None:
        try:
            executor(configs, sweep_id, emit, stop)
        except BaseException as exc:  # noqa: BLE001 - re-raised on the caller's thread
            items.put((None, exc, None))
        else:
            items.put((None, finished, None))

    thread = threading.Thread(target=execute, name="tradeoff-lab-sweep", daemon=True)
    thread.start()
    results: list[Result] = []
    try:
        while True:
            if cancel is not None and cancel.is_set():
                stop.set()
            try:
                index, item, handled = items.get(timeout=POLL_S)
            except queue.Empty:
                continue
            if index is None:
                if item is finished:
                    return results
                raise item  # the executor itself failed, e.g. the cluster went away
            if isinstance(item, Result):
                results.append(item)
                if on_result is not None:
                    on_result(item)
                if cancel is not None and cancel.is_set():
                    stop.set()  # before its lane may start another config
                handled.set()
            elif progress is not None:
                progress(item.within(index=index + 1, count=len(configs)))
    finally:
        # On the way out by an exception: nothing this sweep started may outlive it.
        stop.set()
        thread.join()
