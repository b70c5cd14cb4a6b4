"""Run a decision-tool measurement (timeline, timing pitfall) in a fresh worker process.

``worker.Worker`` runs exactly one thing, ``measure.run_benchmark``; the memory timeline and
the timing-pitfall demo measure something else on the same training step, but need the
same protection: a CUDA context, an OOM or a crash stays out of the caller (the dashboard),
and the device is shared through the same queue (``devicelock.device_queue``), so they
never run while a benchmark is timing the device. A fresh process per call also gives the
timeline an empty allocator to start from. The price is the start-up (importing torch,
a few seconds), acceptable for these one-off measurements.

Every decision tool builds its step with ``step.build_step``, as ``measure.run_benchmark``
does, so all of them measure the one training-step code path of ``engine/step.py``.
"""
from __future__ import annotations

import multiprocessing as mp
import multiprocessing.connection
import os
import signal
import sys
import threading
import time
from typing import Callable

from .config import resolve_device
from .devicelock import device_queue
from .results import classify_exception

POLL_S = 0.05


class IsolatedRunError(RuntimeError):
    """The isolated call failed; ``status`` is "oom", "error", "timeout" or "cancelled"."""

    def __init__(self, status: str, message: str):
        super().__init__(message)
        self.status = status


def _child(conn, func: Callable, args: tuple) -> None:
    # As in worker.py: the parent decides when the call stops (Ctrl-C reaches the whole
    # process group), and whatever the model prints goes to stderr, keeping a caller's
    # stdout (e.g. ``--json``) clean.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    try:
        conn.send(("ok", func(*args)))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, whatever it is
        conn.send(classify_exception(exc))
    finally:
        conn.close()


def call_isolated(func: Callable, *args, device: str, timeout_s: float, cancel: threading.Event | None = None):
    """``func(*args)`` in a fresh spawn-context process, after waiting for ``device``.

    ``func`` must be a module-level function and its arguments and return value picklable.
    Returns what it returns; raises IsolatedRunError with an oom/error/timeout/cancelled
    status when it raises, dies, runs past ``timeout_s`` or ``cancel`` is set.
    """
    ctx = mp.get_context("spawn")
    with device_queue(resolve_device(device)):
        parent, child = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_child, args=(child, func, args), name="tradeoff-lab-decision", daemon=True)
        proc.start()
        child.close()  # only the child holds its end now, so its death reads as EOF here
        deadline = time.monotonic() + timeout_s
        try:
            while True:
                if parent.poll():
                    try:
                        status, payload = parent.recv()
                    except EOFError:
                        proc.join(timeout=5)
                        raise IsolatedRunError("error", f"worker died (exit code {proc.exitcode})") from None
                    if status == "ok":
                        return payload
                    raise IsolatedRunError(status, payload)
                if not proc.is_alive() and not parent.poll():
                    raise IsolatedRunError("error", f"worker died (exit code {proc.exitcode})")
                if cancel is not None and cancel.is_set():
                    raise IsolatedRunError("cancelled", "cancelled; the worker was stopped")
                if time.monotonic() >= deadline:
                    raise IsolatedRunError("timeout", f"timed out after {timeout_s:g} s; the worker was stopped")
                multiprocessing.connection.wait([parent, proc.sentinel], timeout=POLL_S)
        finally:
            if proc.is_alive():
                proc.kill()
            proc.join()
            parent.close()
