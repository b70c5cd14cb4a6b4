"""Progress of a run, a sweep or a decision tool: one event type and one way to say it.

The engine emits ``Progress`` events (the worker while queued and starting, the benchmark
per phase and step, sweeps and the batch finder adding which config or trial it is); the
CLI, the Run page and every background task show ``event.describe()``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

# The phases of one benchmark, in order, with how each is put into words.
PHASE_WORDS = {
    "build": "building the model",
    "warmup": "warm-up step",
    "measure": "measuring step",
    "peak": "peak memory of a compiled step",
    "breakdown": "memory breakdown",
    "flops": "counting FLOPs",
    "numerics": "checking gradients against fp32",
}
PHASE_ORDER = tuple(PHASE_WORDS)


@dataclass(frozen=True)
class Progress:
    """One progress event.

    ``phase`` is ``queued`` (waiting for the device, ``position`` = place in the queue),
    ``starting`` (the worker process starts), ``running`` (a decision tool at work) or a
    benchmark phase of ``PHASE_ORDER`` with ``step`` of ``total``. ``index``/``count`` say
    which config of a sweep it is; ``batch``/``trial`` which batch-finder trial.
    """

    phase: str
    step: int = 0
    total: int = 0
    position: int | None = None
    index: int | None = None
    count: int | None = None
    batch: int | None = None
    trial: int | None = None
    limit_left_s: float | None = None  # a search's time left of its own limit (the batch finder's)

    def within(self, **context) -> "Progress":
        """The same event with sweep or trial context added."""
        return dataclasses.replace(self, **context)

    def describe(self) -> str:
        """The event in words, e.g. "Run 2 of 8: measuring step 4 of 10"."""
        prefix = ""
        if self.trial is not None:
            prefix = f"trying batch {self.batch} (trial {self.trial}): "
        elif self.count is not None and self.count > 1:
            prefix = f"Run {self.index} of {self.count}: "
        limit = f" · {self.limit_left_s:.0f} s left of its time limit" if self.limit_left_s is not None else ""
        return prefix + self._phase_words() + limit

    def _phase_words(self) -> str:
        if self.phase == "queued":
            return f"waiting for the device (place {self.position} in the queue)"
        if self.phase == "starting":
            return "starting the worker"
        words = PHASE_WORDS.get(self.phase, self.phase)
        if self.phase in ("warmup", "measure") and self.total:
            return f"{words} {min(self.step, self.total)} of {self.total}"
        return words

    def fraction(self) -> float:
        """How far the current config is, in [0, 1], from its benchmark phase."""
        if self.phase not in PHASE_ORDER:
            return 0.0
        within = min(self.step, self.total) / self.total if self.total else 0.0
        return (PHASE_ORDER.index(self.phase) + within) / len(PHASE_ORDER)


def timing_words(elapsed_s: float, fraction: float) -> str:
    """Elapsed time and, once there is something to extrapolate from, the time left, e.g.
    "12 s elapsed · about 18 s left" (an estimate from the share done so far)."""
    words = f"{duration_words(elapsed_s)} elapsed"
    if 0.05 <= fraction < 1:
        words += f" · about {duration_words(elapsed_s * (1 - fraction) / fraction)} left"
    return words


def duration_words(seconds: float) -> str:
    """A duration for people: "42 s", "12 min", "1.5 h"."""
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


ProgressFn = Callable[[Progress], None]
