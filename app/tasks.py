"""Decision-tool calls and benchmark jobs followed from a page: start them in a background
thread, show their progress with a Cancel button in a polling fragment, rerun the page when
they finish. Shared by the Run, Compare and Decide pages."""
import threading

import streamlit as st

from engine.isolated import IsolatedRunError

POLL_S = 0.5


class Task:
    """One decision-tool call running in a daemon thread: ``fn(progress, cancel) -> value``.
    The page reads ``event``/``done``/``value``/``error``; no Streamlit call in the thread."""

    def __init__(self, fn):
        self.cancel = threading.Event()
        self.event: dict = {}
        self.value = None
        self.error: str | None = None
        self.done = False
        threading.Thread(target=self._run, args=(fn,), name="tradeoff-lab-decide", daemon=True).start()

    def _run(self, fn) -> None:
        try:
            self.value = fn(self._progress, self.cancel)
        except IsolatedRunError as exc:
            self.error = f"{exc.status.upper()}: {exc}"
        except Exception as exc:  # noqa: BLE001 - shown on the page instead of dying with the thread
            self.error = f"{type(exc).__name__}: {exc}"
        finally:
            self.done = True

    def _progress(self, event: dict) -> None:
        self.event = dict(event)

    def describe(self) -> str:
        event = self.event
        prefix = f"batch {event['batch']} (trial {event['trial']}): " if "trial" in event else ""
        if event.get("phase") == "queued":
            return prefix + f"waiting for the device (place {event.get('position')} in the queue)"
        if "total" in event:
            return prefix + f"{event.get('phase')}, step {event.get('step', 0)} of {event['total']}"
        return prefix + (event.get("phase") or "running")


def task_button(key: str, button: str, fn, status: str, where=st) -> Task | None:
    """A primary ``button`` (in ``where``, e.g. a column) that starts ``fn(progress, cancel)``
    as the task under ``key``, disabled while it runs; then ``follow(key, status)``."""
    running = key in st.session_state and not st.session_state[key].done
    if where.button(button, type="primary", disabled=running, key=f"{key}.start"):
        st.session_state[key] = Task(fn)
        st.rerun()
    return follow(key, status)


def follow(key: str, label: str) -> Task | None:
    """Progress and Cancel of the task under ``key`` while it runs, polled in a fragment that
    reruns the page when the task ends; returns the task once it finished without error."""
    task = st.session_state.get(key)
    if task is None:
        return None
    shown = f"{key}.shown"
    st.session_state[shown] = task.done  # this (full) run draws the finished task

    @st.fragment(run_every=None if task.done else POLL_S)
    def panel() -> None:
        if task.done:
            if not st.session_state[shown]:
                st.rerun()
            return
        with st.status(f"{label}: {task.describe()}", state="running"):
            st.caption("Runs in the engine's worker; the page stays usable.")
        if st.button("Cancel", key=f"{key}.cancel", disabled=task.cancel.is_set()):
            task.cancel.set()

    panel()
    if task.done and task.error:
        st.error(task.error)
    return task if task.done and task.error is None else None


def follow_job(key: str) -> None:
    """Progress of a ``jobs.BenchJob`` (runs for the prediction or the recommender); the page
    reruns whenever a run of it is stored, so the answers above include it."""
    job = st.session_state.get(key)
    if job is None:
        return
    seen = f"{key}.seen"
    st.session_state[seen] = job.snapshot().version

    @st.fragment(run_every=None if job.snapshot().finished else POLL_S)
    def panel() -> None:
        state = job.snapshot()
        if state.version != st.session_state[seen]:
            st.rerun()
        if state.finished:
            st.caption(state.describe())
            return
        st.progress(state.fraction(), text=state.describe())
        if st.button("Cancel", key=f"{key}.cancel", disabled=state.cancelling):
            job.cancel()

    panel()
