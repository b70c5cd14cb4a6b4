"""Background tasks followed from a page: benchmarks, sweeps and every decision tool.

A benchmark or a tool takes seconds to minutes, and a Streamlit script run must stay short
so the page stays responsive, so a page only starts a ``Task`` (a daemon thread calling the
engine) and shows it with ``task_button``: a button that starts it, then one follower
fragment that polls the task's ``state()``, shows its progress in words with a Cancel
button and reruns the whole page whenever a run of it is stored and when it ends.

Each finished run is stored at once (one transaction per run) before the task reports it,
so nothing the page shows as done is ever lost; a run the database refuses (full disk,
damaged file) stops the task with why, and is still shown and offered as a file. No
Streamlit call happens in the thread.
"""
from __future__ import annotations

import sqlite3
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import streamlit as st

from engine import sweep, worker
from engine.config import BenchConfig
from engine.progress import Progress, timing_words
from engine.results import Result
from engine.store import Store, StoreError

from . import exports, storage, tables, ui

POLL_S = 0.5
# work(progress, on_result, cancel) -> value: the engine call a task makes, with the callbacks
# every engine entry point takes. An engine ``Outcome`` it returns is unwrapped.
Work = Callable[[Callable[[Progress], None], Callable[[Result], None], threading.Event], Any]


@dataclass(frozen=True)
class TaskState:
    """A consistent copy of a task's state for one render."""

    label: str
    configs: tuple[BenchConfig, ...]  # the runs it makes, in order, when known up front (else empty)
    results: tuple[Result, ...]  # the runs finished so far, in order
    unsaved: tuple[Result, ...]  # those of them the database refused (the last one: the task stops there)
    event: Progress  # the latest progress event
    done: bool
    cancelling: bool
    error: str | None  # why it failed: an engine failure status, or an unexpected exception
    value: Any  # what the work returned, once done
    version: int  # grows with every stored run and at the end: the page reruns when it changes
    elapsed_s: float = 0.0  # since the task started

    @property
    def succeeded(self) -> bool:
        """Finished without an error (its value is the answer)."""
        return self.done and self.error is None

    @property
    def queue_position(self) -> int | None:
        """Place in the device queue while waiting for the device (1 = next), else None."""
        return self.event.position if self.event.phase == "queued" and not self.done else None

    def fraction(self) -> float:
        """Overall progress in [0, 1]: finished runs plus the running one's phase progress."""
        if self.done:
            return 1.0
        if not self.configs:
            return self.event.fraction()
        return min((len(self.results) + self.event.fraction()) / len(self.configs), 1.0)

    def describe(self) -> str:
        """One line for the progress bar: what the task does and where it is."""
        words = "cancelling..." if self.cancelling else self.event.describe()
        return f"{self.label} · {words} · {timing_words(self.elapsed_s, self.fraction())}"


class Task:
    """One engine call running in a daemon thread; results it reports are stored first."""

    def __init__(self, label: str, work: Work, store: Store | None, configs: Iterable[BenchConfig] = ()):
        self._label = label
        self._configs = tuple(configs)
        self._store = store
        self._cancel = threading.Event()
        self._lock = threading.Lock()
        self._results: list[Result] = []
        self._unsaved: list[Result] = []
        self._event = Progress("starting")
        self._done = False
        self._error: str | None = None
        self._value = None
        self._version = 0
        self._started = time.monotonic()
        # Before anything is measured: a damaged or read-only database fails the start, with
        # why, instead of losing the first result. (A task that stores nothing has no store.)
        if store is not None:
            store.check_writable()
        threading.Thread(target=self._run, args=(work,), name="tradeoff-lab-task", daemon=True).start()

    def cancel(self) -> None:
        """Ask the engine to stop: the running config ends "cancelled" and no later one starts."""
        self._cancel.set()

    def state(self) -> TaskState:
        """A consistent copy of the task's state."""
        with self._lock:
            return TaskState(self._label, self._configs, tuple(self._results), tuple(self._unsaved), self._event,
                             self._done, self._cancel.is_set(), self._error, self._value, self._version,
                             time.monotonic() - self._started)

    def _on_progress(self, event: Progress) -> None:
        with self._lock:
            self._event = event

    def _on_result(self, result: Result) -> None:
        try:
            if self._store is not None:
                self._store.add(result)  # stored before it is shown: what the page says is done is on disk
        except (StoreError, sqlite3.Error):
            # Shown and offered as a file instead; raised on, so the engine stops (every
            # later run would be refused the same way) and _run says why.
            with self._lock:
                self._results.append(result)
                self._unsaved.append(result)
            raise
        with self._lock:
            self._results.append(result)
            self._event = Progress("starting")
            self._version += 1

    def _run(self, work: Work) -> None:
        value, error = None, None
        try:
            value = work(self._on_progress, self._on_result, self._cancel)
            if isinstance(value, worker.Outcome):
                value, error = value.value, None if value.ok else f"{value.status.upper()}: {value.error}"
        except (StoreError, sqlite3.Error) as exc:
            error = f"{self._label} stopped: {storage.database_problem(self._store.path, exc)}"
        except Exception as exc:  # noqa: BLE001 - the engine returns failures as results; anything
            # else raised here (a bug) must reach the page instead of dying with the thread.
            error = f"{self._label} failed unexpectedly: {type(exc).__name__}: {exc}"
        with self._lock:
            self._value, self._error, self._done = value, error, True
            self._version += 1


def benchmarks(label: str, configs: Iterable[BenchConfig], store: Store, as_sweep: bool = True) -> Task:
    """A task that benchmarks ``configs`` in order: as one sweep (one sweep id, going on past
    failures), or a single run on its own."""
    configs = list(configs)

    def work(progress, on_result, cancel):
        if as_sweep:
            return sweep.run_sweep(configs, progress, on_result, cancel)
        return on_result(worker.run(configs[0], progress, cancel))

    return Task(label, work, store, configs)


def task_button(key: str, button: str, start: Callable[[], Task], where=st, disabled: bool = False,
                **button_args) -> TaskState | None:
    """A button (in ``where``, e.g. a column; primary unless ``button_args`` say otherwise)
    that starts ``start()`` as the task under ``key``, disabled while it runs; then the task's
    follower. Returns the task's state (None before the first start)."""
    current = st.session_state.get(key)
    running = current is not None and not current.state().done
    if where.button(button, disabled=running or disabled, key=f"{key}.start", **{"type": "primary", **button_args}):
        st.session_state[key] = start()
        st.rerun()
    return follow(key)


def follow(key: str) -> TaskState | None:
    """The task under ``key``: its progress in words, a Cancel button and, for several runs,
    their queue, in a fragment polled every POLL_S s that reruns the whole page when a run is
    stored or the task ends; its error once it failed. Returns the state this page run shows."""
    task: Task | None = st.session_state.get(key)
    if task is None:
        return None
    state = task.state()
    seen = f"{key}.seen"
    st.session_state[seen] = state.version  # what this (full) page run draws

    @st.fragment(run_every=None if state.done else POLL_S)
    def follower() -> None:
        now = task.state()
        if now.version != st.session_state[seen]:
            st.rerun()  # a run was stored or the task ended: redraw the page with it
        if not now.done:
            st.progress(now.fraction(), text=ui.plain(now.describe()))
            if st.button("Cancel", key=f"{key}.cancel", disabled=now.cancelling):
                task.cancel()
                st.rerun(scope="fragment")
        elif now.configs:
            st.caption(f"Finished {len(now.results)} of {len(now.configs)} run(s)")
        if len(now.configs) > 1:
            st.dataframe(tables.queue_frame(list(now.configs), list(now.results), now.done,
                                            now.queue_position is not None), hide_index=True)

    follower()
    if state.error:
        st.error(ui.plain(state.error))
    if state.unsaved:
        st.download_button(f"Download the {len(state.unsaved)} run(s) the database did not store",
                           exports.bundle_bytes(list(state.unsaved)), file_name="tradeoff-lab-unsaved-runs.jsonl",
                           mime="application/jsonl", on_click="ignore", icon=":material/download:", key=f"{key}.unsaved")
    return state
