"""Run each benchmark in a worker process, so an OOM, crash or hang never harms the caller.

A ``Worker`` keeps one spawn-context subprocess warm and reuses it for the next config
(importing torch and the engine costs seconds, which would dominate a sweep of small
configs). After any failure the process is discarded and the next config gets a fresh one,
because a process that ran out of memory, timed out or raised mid-step may hold leaked
allocator state, a lowered memory limit or half-initialised CUDA state.

Protocol on the pipe (child -> parent): ("ready", pid) once, then per run ("env", env),
any number of ("progress", event) and finally ("result", result). Parent -> child:
(config, sweep_id) per run, or None to exit.
"""
from __future__ import annotations

import contextlib
import gc
import multiprocessing as mp
import multiprocessing.connection
import os
import platform
import resource
import signal
import sys
import threading
import time
import traceback
from typing import Callable

from .config import GIB, BenchConfig, resolve_device
from .devicelock import device_queue
from .results import classify_exception, new_result

STARTUP_TIMEOUT_S = 120.0
POLL_S = 0.05
Progress = Callable[[dict], None] | None


# ------------------------------------------------------------------------- child side
def _address_space_bytes() -> int:
    """Current virtual address-space size of this process (Linux /proc)."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[0])
    return pages * os.sysconf("SC_PAGE_SIZE")


@contextlib.contextmanager
def _cpu_memory_cap(config: BenchConfig, device: str):
    """Cap further address-space growth at ``memory_cap_gib`` for the run (CPU only).

    RLIMIT_AS bounds virtual memory, so allocations beyond the cap fail inside the
    allocator and surface as an OOM exception instead of the kernel killing the process.
    Only the soft limit changes: lowering and raising a soft limit up to the hard limit
    needs no privilege, so the warm worker can restore it afterwards. (Virtual size
    over-counts reserved-but-untouched pages, so the cap errs on the strict side.)
    """
    if config.memory_cap_gib is None or device != "cpu":
        yield
        return
    if not os.path.exists("/proc/self/statm"):
        raise RuntimeError("a CPU memory cap needs Linux (it measures the address space in /proc)")
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = _address_space_bytes() + int(config.memory_cap_gib * GIB)
    for existing in (soft, hard):
        if existing != resource.RLIM_INFINITY:
            limit = min(limit, existing)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def _error_message(exc: BaseException) -> tuple[str, str]:
    """classify_exception's (status, message), plus where a non-OOM error was raised."""
    status, message = classify_exception(exc)
    frames = traceback.extract_tb(exc.__traceback__)
    if status == "error" and frames:
        where = frames[-1]
        message += f" (at {where.filename}:{where.lineno} in {where.name})"
    return status, message


def _run_one(config: BenchConfig, sweep_id: str | None, conn, envs: dict, run_benchmark) -> dict:
    from .envinfo import env_info

    device = resolve_device(config.device)
    if device not in envs:
        envs[device] = env_info(device)
    env = envs[device]
    conn.send(("env", env))
    failure = None
    try:
        with _cpu_memory_cap(config, device):
            result = run_benchmark(config, lambda event: conn.send(("progress", dict(event))))
    except BaseException as exc:  # noqa: BLE001 - user code may raise anything, even SystemExit
        failure = _error_message(exc)
    # Built outside the cap, so reporting an OOM never itself runs out of memory.
    if failure is not None:
        status, message = failure
        if status == "oom" and config.memory_cap_gib is not None and device == "cpu":
            message += f" (CPU memory cap: {config.memory_cap_gib:g} GiB)"
        result = new_result(config, status, env, error=message)
    result["sweep_id"] = sweep_id
    return result


def _release_memory() -> None:
    """Free what the last run left so the next config starts from an empty allocator."""
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def _child_main(conn) -> None:
    # The parent decides when a run stops: Ctrl-C in a terminal reaches the whole process
    # group, and the parent then kills this process itself.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Whatever user code or libraries print goes to stderr, so a caller's stdout (e.g.
    # `python -m engine run --json`) carries only its own output.
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    from .measure import run_benchmark

    conn.send(("ready", os.getpid()))
    envs: dict[str, dict] = {}
    while True:
        try:
            message = conn.recv()
        except EOFError:  # the parent is gone
            return
        if message is None:
            return
        config, sweep_id = message
        result = _run_one(config, sweep_id, conn, envs, run_benchmark)
        conn.send(("result", result))
        _release_memory()


# ------------------------------------------------------------------------- parent side
class _Stop(Exception):
    """A run ends without a result from the child: status and message of the failure."""

    def __init__(self, status: str, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def _fallback_env(device: str) -> dict:
    """What the parent knows without touching the device (initialising CUDA in the caller
    would put a CUDA context on the GPU being measured)."""
    torch = sys.modules.get("torch")
    return {
        "device_type": device.split(":")[0],
        "torch": getattr(torch, "__version__", None),
        "python": platform.python_version(),
    }


class Worker:
    """One warm worker process, reused between configs and replaced after any failure."""

    def __init__(self) -> None:
        self._ctx = mp.get_context("spawn")
        self._proc = None
        self._conn = None
        self._lock = threading.Lock()
        self._envs: dict[str, dict] = {}  # per device, as last reported by a child

    @property
    def pid(self) -> int | None:
        """The warm process's pid, or None when no process is running."""
        return self._proc.pid if self._proc is not None and self._proc.is_alive() else None

    def run(self, config: BenchConfig, progress: Progress = None, cancel: threading.Event | None = None,
            sweep_id: str | None = None) -> dict:
        """Run one benchmark in the worker; always returns a result dict.

        Waits for the device first (``devicelock.device_queue``; while queued, progress gets
        ``{"phase": "queued", "position": n}``). Status is "ok", "oom", "error" (exception
        or the worker died), "timeout" (past ``config.timeout_s`` from the start of the run)
        or "cancelled" (``cancel`` was set). An exception raised by ``progress`` (e.g. a UI
        stopping the script) kills the worker and propagates.
        """
        device = resolve_device(config.device)
        last_position = None

        def on_wait(position: int) -> None:
            nonlocal last_position
            if cancel is not None and cancel.is_set():
                raise _Stop("cancelled", "cancelled while waiting for the device")
            if progress is not None and position != last_position:
                progress({"phase": "queued", "position": position})
            last_position = position

        try:
            if cancel is not None and cancel.is_set():
                raise _Stop("cancelled", "cancelled before it started")
            with device_queue(device, on_wait), self._lock:
                return self._run_here(config, device, progress, cancel, sweep_id)
        except _Stop as stop:
            env = self._envs.get(device) or _fallback_env(device)
            return new_result(config, stop.status, env, error=stop.message, sweep_id=sweep_id)

    def _run_here(self, config, device, progress, cancel, sweep_id) -> dict:
        try:
            if self._proc is None or not self._proc.is_alive():
                self._start(cancel)
            self._conn.send((config, sweep_id))
            deadline = time.monotonic() + config.timeout_s
            while True:
                kind, payload = self._next_message(deadline, cancel, config.timeout_s)
                if kind == "env":
                    self._envs[device] = payload
                elif kind == "progress" and progress is not None:
                    progress(payload)
                elif kind == "result":
                    if payload["status"] != "ok":
                        self._kill()
                    return payload
        except BaseException:
            # A failed run, a timeout, a cancel, or the caller's own exception: the child
            # is mid-run or broken, and the next config must get a clean one.
            self._kill()
            raise

    def _start(self, cancel) -> None:
        parent_conn, child_conn = self._ctx.Pipe(duplex=True)
        self._proc = self._ctx.Process(target=_child_main, args=(child_conn,), name="tradeoff-lab-worker", daemon=True)
        self._proc.start()
        child_conn.close()  # only the child holds its end, so its death reads as EOF here
        self._conn = parent_conn
        kind, _ = self._next_message(time.monotonic() + STARTUP_TIMEOUT_S, cancel, STARTUP_TIMEOUT_S)
        if kind != "ready":
            raise _Stop("error", f"worker failed to start (sent {kind!r})")

    def _next_message(self, deadline: float, cancel, timeout_s: float) -> tuple:
        while True:
            # Messages first: a result that arrived just before a death or deadline counts.
            if self._conn.poll():
                try:
                    return self._conn.recv()
                except EOFError:
                    raise _Stop("error", self._death_cause()) from None
            if not self._proc.is_alive() and not self._conn.poll():
                raise _Stop("error", self._death_cause())
            if cancel is not None and cancel.is_set():
                raise _Stop("cancelled", "cancelled; the worker was stopped")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise _Stop("timeout", f"timed out after {timeout_s:g} s; the worker was stopped")
            multiprocessing.connection.wait([self._conn, self._proc.sentinel], timeout=min(remaining, POLL_S))

    def _death_cause(self) -> str:
        self._proc.join(timeout=5)
        code = self._proc.exitcode
        if code is None:
            return "worker died: it closed its pipe but is still running"
        if code < 0:
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = str(-code)
            hint = " (on Linux often the kernel's out-of-memory killer)" if -code == signal.SIGKILL else ""
            return f"worker died: killed by signal {name}{hint}"
        return f"worker died: exit code {code}"

    def _kill(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.join()
        if self._conn is not None:
            self._conn.close()
        self._proc = self._conn = None

    def close(self) -> None:
        """Stop the worker process (politely, then by force)."""
        with self._lock:
            if self._proc is not None and self._proc.is_alive():
                with contextlib.suppress(OSError):
                    self._conn.send(None)
                self._proc.join(timeout=5)
            self._kill()


_shared: dict[str, Worker] = {}
_shared_lock = threading.Lock()


def shared_worker(device: str) -> Worker:
    """The process-wide warm worker for a (resolved) device."""
    with _shared_lock:
        if device not in _shared:
            _shared[device] = Worker()
        return _shared[device]


def run_isolated(config: BenchConfig, progress: Progress = None, cancel: threading.Event | None = None,
                 sweep_id: str | None = None) -> dict:
    """``Worker.run`` on a shared warm worker per device; safe to call from many threads."""
    return shared_worker(resolve_device(config.device)).run(config, progress, cancel, sweep_id)
