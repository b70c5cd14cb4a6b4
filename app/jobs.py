"""Benchmarks started from the Run page, run in a background thread.

A benchmark takes seconds to minutes, and a Streamlit script run must stay short so the page
stays responsive, so the page only starts a ``BenchJob`` and polls ``snapshot()``. The thread
calls the engine (``worker.run_isolated`` for one config, ``sweep.run_sweep`` for several),
which runs each config in a worker process and waits in the device queue first; each finished
result is stored at once (one transaction per run), so nothing shown as done is ever lost.
No Streamlit call happens in the thread.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass

from engine import sweep, worker
from engine.config import BenchConfig
from engine.store import Store

# The phases a run reports, in order; the progress bar advances through them.
PHASE_ORDER = ("build", "warmup", "measure", "breakdown", "flops")


@dataclass(frozen=True)
class JobSnapshot:
    """A consistent copy of a job's state for one render."""

    configs: tuple[BenchConfig, ...]
    results: tuple[dict, ...]
    event: dict  # the latest progress event of the running config ({} before the first)
    finished: bool
    cancelling: bool
    failure: str | None  # an unexpected exception in the job thread
    version: int  # grows with every result and at the end: the page reruns when it changes

    @property
    def queue_position(self) -> int | None:
        """Place in the device queue while waiting for the device (1 = next), else None."""
        return self.event.get("position") if self.event.get("phase") == "queued" else None

    def fraction(self) -> float:
        """Overall progress in [0, 1]: finished configs plus the running one's phase progress."""
        if self.finished:
            return 1.0
        done = len(self.results)
        phase = self.event.get("phase")
        within = 0.0
        if phase in PHASE_ORDER:
            total = self.event.get("total") or 1
            within = (PHASE_ORDER.index(phase) + min(self.event.get("step", 0), total) / total) / len(PHASE_ORDER)
        return min((done + within) / len(self.configs), 1.0)

    def describe(self) -> str:
        """One line for the progress bar: which config, phase, step i of n."""
        n = len(self.configs)
        if self.finished:
            return f"Finished {len(self.results)} of {n} run(s)"
        prefix = f"Run {len(self.results) + 1} of {n}: " if n > 1 else ""
        if self.cancelling:
            return prefix + "cancelling..."
        if self.queue_position is not None:
            return prefix + f"waiting for the device (place {self.queue_position} in the queue)"
        phase = self.event.get("phase")
        if phase is None:
            return prefix + "starting the worker"
        if "total" in self.event:
            return prefix + f"{phase}, step {self.event.get('step', 0)} of {self.event['total']}"
        return prefix + phase


class BenchJob:
    """One benchmark (or a sweep of several) running in a daemon thread."""

    def __init__(self, configs: list[BenchConfig], store: Store, as_sweep: bool):
        if not configs:
            raise ValueError("a job needs at least one config")
        self._configs = tuple(configs)
        self._store = store
        self._as_sweep = as_sweep
        self._cancel = threading.Event()
        self._lock = threading.Lock()
        self._results: list[dict] = []
        self._event: dict = {}
        self._finished = False
        self._failure: str | None = None
        self._version = 0
        self._thread = threading.Thread(target=self._run, name="tradeoff-lab-job", daemon=True)

    def start(self) -> "BenchJob":
        self._thread.start()
        return self

    def cancel(self) -> None:
        """Ask the engine to stop: the running config ends "cancelled" and no later one starts."""
        self._cancel.set()

    def snapshot(self) -> JobSnapshot:
        with self._lock:
            return JobSnapshot(self._configs, tuple(self._results), dict(self._event), self._finished,
                               self._cancel.is_set(), self._failure, self._version)

    def _on_progress(self, event: dict) -> None:
        with self._lock:
            self._event = dict(event)

    def _on_result(self, result: dict) -> None:
        self._store.add(result)  # stored before it is shown: what the page says is done is on disk
        with self._lock:
            self._results.append(result)
            self._event = {}
            self._version += 1

    def _run(self) -> None:
        try:
            if self._as_sweep:
                sweep.run_sweep(list(self._configs), progress=self._on_progress, on_result=self._on_result,
                                cancel=self._cancel)
            else:
                self._on_result(worker.run_isolated(self._configs[0], progress=self._on_progress, cancel=self._cancel))
        except Exception as exc:  # noqa: BLE001 - the engine returns failures as results; anything
            # raised here (a full disk, a bug) must reach the page instead of dying with the thread.
            with self._lock:
                self._failure = f"{type(exc).__name__}: {exc}"
        finally:
            with self._lock:
                self._finished = True
                self._version += 1
