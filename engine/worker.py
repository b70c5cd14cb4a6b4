"""The one way the engine isolates work: a worker process per device, so an OOM, crash or
hang never harms the caller, and one failure style, an ``Outcome`` (or a ``Result``) with a
status, for benchmarks and decision tools alike.

A ``Worker`` keeps one spawn-context subprocess warm and reuses it for the next call
(importing torch and the engine costs seconds, which would dominate a sweep of small
configs). After any failure the process is discarded and the next call gets a fresh one,
because a process that ran out of memory, timed out or raised mid-step may hold leaked
allocator state, a lowered memory limit or half-initialised CUDA state. A tool that needs
an untouched process (``fresh=True``, e.g. the memory timeline) gets a new one.

Every call first waits for its device in the machine-wide queue (``devicelock``), so two
callers never measure one device at once.

Workers are forked from a server process that has already imported torch and the engine
(multiprocessing's forkserver with a preload): a new worker, after a failure or for a tool
that needs an untouched process, is ready in a fraction of a second instead of the seconds
a fresh interpreter spends importing torch. The server never touches a device, so each
worker still initialises CUDA itself, for its one GPU.

A worker never outlives its caller: a caller killed mid-run (kill -9, a closed terminal)
must not leave a process computing on the device while the queue admits the next run,
whose timings it would disturb. Three things see to that: on Linux the kernel kills the
worker when its parent goes (``PR_SET_PDEATHSIG``; its parent is the fork server, which
exits when the caller does); the worker ends itself when a progress message finds the pipe
to its caller broken; and for the length of each call the worker holds a copy of the
device-queue ticket's file descriptor, so the device stays locked until the worker too has
exited (flock locks last while any copy of the open file is open).

Protocol on the pipe (child -> parent): ("ready", pid) once, then per call any number of
("progress", Progress) and ("env", dict), and finally ("done", value) or ("failed",
status, message). Parent -> child: (func, args, n) per call followed by the file descriptors
of its n device tickets (SCM_RIGHTS, ``multiprocessing.reduction.send_handle``; a data-
parallel run on CUDA holds one ticket per GPU), or None to exit.
"""
from __future__ import annotations

import contextlib
import gc
import multiprocessing as mp
import multiprocessing.connection
import multiprocessing.reduction
import os
import platform
import resource
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable

from .config import GIB, BenchConfig
from .devicelock import device_queue
from . import devices
from .devices import resolve_device
from .progress import Progress, ProgressFn
from .results import Result, classify_exception

STARTUP_TIMEOUT_S = 120.0
POLL_S = 0.05
_ORPHAN_EXIT = 1  # exit code of a worker whose parent is gone (nobody reads it)
# What the fork server imports once, so that workers forked from it start warm.
_PRELOAD = ["engine.measure"]


@dataclass(frozen=True)
class Outcome:
    """What an isolated call gave: ``value`` when ``status`` is "ok", else ``error`` says why
    ("oom", "error", "timeout", "cancelled")."""

    status: str
    value: Any = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"


class Channel:
    """What a function running in the worker may tell its caller while it runs. If the
    caller is gone (the pipe is broken), the worker process ends on the spot: nobody would
    see the result, and it must not keep a device busy."""

    def __init__(self, conn):
        self._conn = conn

    def progress(self, event: Progress) -> None:
        """Forward a progress event to the caller."""
        self._send(("progress", event))

    def env(self, env: dict) -> None:
        """The environment being measured, so a failure the child cannot report still names it."""
        self._send(("env", env))

    def _send(self, message: tuple) -> None:
        try:
            self._conn.send(message)
        except (BrokenPipeError, ConnectionError, EOFError):
            os._exit(_ORPHAN_EXIT)


# ------------------------------------------------------------------------- child side
def _error_message(exc: BaseException) -> tuple[str, str]:
    """classify_exception's (status, message), plus where a non-OOM error was raised."""
    status, message = classify_exception(exc)
    frames = traceback.extract_tb(exc.__traceback__)
    if status == "error" and frames:
        where = frames[-1]
        message += f" (at {where.filename}:{where.lineno} in {where.name})"
    return status, message


def _release_memory() -> None:
    """Free what the last call left so the next one starts from an empty allocator."""
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def _die_with_parent() -> None:
    """Have the kernel SIGKILL this process when its parent (the fork server) goes (Linux),
    and leave at once if it went before that took effect. A caller that died even earlier
    is noticed at the first read of the pipe (end of file), before anything runs.

    The fork server exits when every process holding its "alive" pipe has gone; multiprocessing
    hands that pipe to each forked child too, so this process lets go of its copy: then the
    caller's death ends the server, and the server's ends this process.
    """
    import multiprocessing.forkserver

    server = multiprocessing.forkserver._forkserver
    if getattr(server, "_forkserver_alive_fd", None) is not None:
        os.close(server._forkserver_alive_fd)
        server._forkserver_alive_fd = None
    parent = os.getppid()
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1  # <linux/prctl.h>
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() != parent:
        os._exit(_ORPHAN_EXIT)


def _child_main(conn, visible_devices: str | None, alloc_conf: str | None = None) -> None:
    _die_with_parent()
    if visible_devices is not None:
        # Before anything touches CUDA: this process sees exactly its one GPU, as cuda:0.
        devices.pin_this_process(visible_devices)
    if alloc_conf is not None:
        # Also before CUDA initialises: torch reads the allocator settings once, then.
        devices.set_alloc_conf(alloc_conf)
    # The parent decides when a call stops: Ctrl-C in a terminal reaches the whole process
    # group, and the parent then kills this process itself.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Whatever user code or libraries print goes to stderr, so a caller's stdout (e.g.
    # `python -m engine run --json`) carries only its own output.
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    # Loaded before "ready" (already, when forked from the server): importing torch takes
    # seconds, which must not count against the first call's timeout.
    from . import measure  # noqa: F401

    conn.send(("ready", os.getpid()))
    channel = Channel(conn)
    while True:
        try:
            message = conn.recv()
        except EOFError:  # the parent is gone
            return
        if message is None:
            return
        func, args, n_tickets = message
        # These copies of the device tickets keep the devices locked while this call runs,
        # even if the parent dies; they are closed (before replying) once the call is over.
        tickets = []
        try:
            for _ in range(n_tickets):
                tickets.append(multiprocessing.reduction.recv_handle(conn))
        except (EOFError, OSError):  # the parent died between the call and its tickets
            return
        try:
            reply = ("done", func(*args, channel))
        except BaseException as exc:  # noqa: BLE001 - user code may raise anything, even SystemExit
            reply = ("failed", *_error_message(exc))
        finally:
            for ticket in tickets:
                os.close(ticket)
        del func, args
        channel._send(reply)
        del reply
        _release_memory()


# ------------------------------------------------------------------------- benchmarks
def _address_space_bytes() -> int:
    """Current virtual address-space size of this process (Linux /proc)."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[0])
    return pages * os.sysconf("SC_PAGE_SIZE")


# The address-space guard under a CPU cap: far enough above the cap that the run is judged
# on its tracked tensor peak (measure.py), close enough that a run far over it fails fast
# instead of swapping the machine.
_GUARD_FACTOR, _GUARD_SLACK = 2, 2 * GIB


@contextlib.contextmanager
def _cpu_memory_cap(config: BenchConfig, device: str):
    """A safety net under a CPU memory cap: address-space growth is limited to twice the
    cap plus 2 GiB for the run (RLIMIT_AS, soft limit only, restored afterwards).

    The cap itself is judged on the run's tracked tensor peak, the figure it reports as
    ``peak_allocated_bytes`` (counters.check_cpu_cap): the address space over-counts
    (allocator arenas, thread stacks, reserved-but-untouched pages), so judging on it made
    "0.5 GiB" mean about 330 MiB of tensors. Allocations beyond the guard fail inside the
    allocator and surface as an OOM exception instead of the kernel killing the process;
    lowering and raising a soft limit up to the hard limit needs no privilege, so the warm
    worker can restore it.
    """
    if config.memory_cap_gib is None or device != "cpu":
        yield
        return
    if not os.path.exists("/proc/self/statm"):
        raise RuntimeError("a CPU memory cap needs Linux (it measures the address space in /proc)")
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = _address_space_bytes() + int(_GUARD_FACTOR * config.memory_cap_gib * GIB + _GUARD_SLACK)
    for existing in (soft, hard):
        if existing != resource.RLIM_INFINITY:
            limit = min(limit, existing)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


_child_envs: dict[str, dict] = {}  # per device, in the worker process


def benchmark_in_worker(config: BenchConfig, sweep_id: str | None, channel: Channel) -> Result:
    """Run one benchmark inside the worker process; a failure becomes a Result with its status."""
    from .devices import env_info
    from .measure import run_benchmark

    if config.distributed:
        # Its ranks are processes of their own, which own the devices: this process (the
        # launcher's agent) must not touch a GPU.
        from . import distributed

        return distributed.benchmark(config, channel.progress).replace(sweep_id=sweep_id)
    device = resolve_device(config.device)
    if device not in _child_envs:
        _child_envs[device] = env_info(device)
    env = _child_envs[device]
    channel.env(env)
    failure = None
    try:
        with _cpu_memory_cap(config, device):
            result = run_benchmark(config, channel.progress)
    except BaseException as exc:  # noqa: BLE001 - user code may raise anything, even SystemExit
        failure = _error_message(exc)
    # Built outside the cap, so reporting an OOM never itself runs out of memory.
    if failure is not None:
        status, message = failure
        if status == "oom" and config.memory_cap_gib is not None and device == "cpu" and "memory cap" not in message:
            message += f" (CPU memory cap: {config.memory_cap_gib:g} GiB)"
        result = Result.new(config, status, env, error=message)
    return result.replace(sweep_id=sweep_id)


# ------------------------------------------------------------------------- parent side
class _Stop(Exception):
    """A call ends without a reply from the child: status and message of the failure."""

    def __init__(self, status: str, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def fallback_env(device: str, key: str | None = None) -> dict:
    """What the parent knows without touching the device (initialising CUDA in the caller
    would put a CUDA context on the GPU being measured): its type, and for a GPU its UUID
    (``key``, when known), so a run that died before reporting still names the GPU of a box
    with several."""
    torch = sys.modules.get("torch")
    device_type = device.split(":")[0]
    return {"device_type": device_type, "torch": getattr(torch, "__version__", None),
            "python": platform.python_version(), "gpu_uuid": key if device_type == "cuda" else None}


def _gpu_key_if_known(device: str) -> str | None:
    """The queue key (GPU UUID) of ``device``, or None where this process sees no such GPU:
    the result of a run that failed for that very reason must still be made."""
    try:
        return devices.device_key(device)
    except IndexError:
        return None


class Worker:
    """One warm worker process, reused between calls and replaced after any failure.

    ``visible_devices``: the CUDA_VISIBLE_DEVICES value its processes get (one GPU's UUID),
    or None for a CPU/MPS worker. ``queue_key``: the device queue its calls wait in, when the
    worker stands for a device other than the one its calls name (a sweep lane's stand-in in
    tests); default: the queue of each call's device. A call's ``alloc_conf`` (CUDA allocator
    settings, None: the environment's) is set in the process before CUDA initialises; torch
    reads it only then, so a call whose settings differ from the warm process's gets a new
    process.
    """

    def __init__(self, visible_devices: str | None = None, queue_key: str | None = None) -> None:
        self._visible_devices = visible_devices
        self._queue_key = queue_key
        self._ctx = mp.get_context("forkserver")
        self._ctx.set_forkserver_preload(_PRELOAD)
        self._proc = None
        self._conn = None
        self._ready = False  # the process has said "ready" (it was started by a call or by start())
        self._alloc_conf: str | None = None  # the allocator settings the process was started with
        self._lock = threading.Lock()
        self._envs: dict[str, dict] = {}  # per device, as last reported by a child

    @property
    def pid(self) -> int | None:
        """The warm process's pid, or None when no process is running."""
        return self._proc.pid if self._proc is not None and self._proc.is_alive() else None

    def call(self, func: Callable, *args, device: str, timeout_s: float, progress: ProgressFn | None = None,
             cancel: threading.Event | None = None, fresh: bool = False, ranks: int = 1,
             alloc_conf: str | None = None) -> Outcome:
        """``func(*args, channel)`` in the worker process, after waiting for ``device`` (and,
        on CUDA, the next GPUs for a run of ``ranks`` data-parallel ranks: every GPU it uses).

        ``func`` must be a module-level function, its arguments and return value picklable.
        Never raises for a failure of the call: the Outcome's status is "oom" or "error"
        (it raised, or the process died), "timeout" (past ``timeout_s``) or "cancelled"
        (``cancel`` was set). While queued, ``progress`` gets ``Progress("queued",
        position=n)``. An exception raised by ``progress`` itself (e.g. a UI stopping the
        script) kills the worker and propagates.
        """
        device = resolve_device(device)
        last_position = None

        def on_wait(position: int) -> None:
            nonlocal last_position
            if cancel is not None and cancel.is_set():
                raise _Stop("cancelled", "cancelled while waiting for the device")
            if progress is not None and position != last_position:
                progress(Progress("queued", position=position))
            last_position = position

        try:
            if cancel is not None and cancel.is_set():
                raise _Stop("cancelled", "cancelled before it started")
            # A lane's worker waits in its own device's queue; any other takes every GPU of the
            # run's ranks, all callers in one order (sorted keys), so two runs that need
            # overlapping GPUs never each hold one the other waits for.
            keys = [self._queue_key] if self._queue_key else sorted(devices.device_keys(device, ranks))
            with contextlib.ExitStack() as held:
                tickets = [held.enter_context(device_queue(key, on_wait)) for key in keys]
                with self._lock:
                    return self._call_here(func, args, device, timeout_s, progress, cancel, fresh, tickets, alloc_conf)
        except _Stop as stop:
            return Outcome(stop.status, error=stop.message)

    def run(self, config: BenchConfig, progress: ProgressFn | None = None, cancel: threading.Event | None = None,
            sweep_id: str | None = None, device: str | None = None) -> Result:
        """Benchmark ``config`` in the worker; always returns a Result ("ok", "oom", "error",
        "timeout" or "cancelled").

        ``device``: the device it waits for and runs on when not the config's own (a sweep
        lane's ``cuda:1`` for an ``auto`` config); the worker's process sees only that GPU,
        where every CUDA name is it, so the config itself, and the result, keep ``auto``.
        """
        device = device or config.device
        outcome = self.call(benchmark_in_worker, config, sweep_id, device=device, timeout_s=config.timeout_s,
                            progress=progress, cancel=cancel, ranks=config.nproc,
                            alloc_conf=config.alloc_conf)
        if outcome.ok:
            return outcome.value
        device = resolve_device(device)
        env = self._envs.get(device) or fallback_env(device, self._queue_key or _gpu_key_if_known(device))
        return Result.new(config, outcome.status, env, error=outcome.error, sweep_id=sweep_id)

    def _call_here(self, func, args, device, timeout_s, progress, cancel, fresh, tickets: list[int],
                   alloc_conf: str | None = None) -> Outcome:
        try:
            if fresh or alloc_conf != self._alloc_conf:
                self._kill()
            if self._proc is None or not self._proc.is_alive():
                self._spawn(alloc_conf)
            if not self._ready:
                self._await_ready(cancel)
            self._conn.send((func, args, len(tickets)))
            for ticket in tickets:
                multiprocessing.reduction.send_handle(self._conn, ticket, self._proc.pid)
            deadline = time.monotonic() + timeout_s
            while True:
                kind, *payload = self._next_message(deadline, cancel, timeout_s)
                if kind == "env":
                    self._envs[device] = payload[0]
                elif kind == "progress":
                    if progress is not None:
                        progress(payload[0])
                elif kind == "done":
                    value = payload[0]
                    if isinstance(value, Result) and not value.ok:
                        self._kill()  # a failed benchmark may leave the process in a bad state
                    return Outcome("ok", value)
                elif kind == "failed":
                    self._kill()
                    return Outcome(payload[0], error=payload[1])
        except BaseException:
            # A timeout, a cancel, a death, or the caller's own exception: the child is
            # mid-call or broken, and the next call must get a clean one.
            self._kill()
            raise

    def start(self) -> None:
        """Start the worker process now without waiting for it (it imports torch and the
        engine, seconds), e.g. while the caller runs its own pre-run checks; the next call
        waits until it is ready (or, with allocator settings, replaces it: a fork, a
        fraction of a second). Nothing touches the device until a call holds it."""
        with self._lock:
            if self._proc is None or not self._proc.is_alive():
                self._spawn()

    def _spawn(self, alloc_conf: str | None = None) -> None:
        parent_conn, child_conn = self._ctx.Pipe(duplex=True)
        self._proc = self._ctx.Process(target=_child_main, args=(child_conn, self._visible_devices, alloc_conf),
                                       name="tradeoff-lab-worker", daemon=True)
        self._alloc_conf = alloc_conf
        self._proc.start()
        child_conn.close()  # only the child holds its end, so its death reads as EOF here
        self._conn = parent_conn
        self._ready = False

    def _await_ready(self, cancel) -> None:
        kind, *_ = self._next_message(time.monotonic() + STARTUP_TIMEOUT_S, cancel, STARTUP_TIMEOUT_S)
        if kind != "ready":
            raise _Stop("error", f"worker failed to start (sent {kind!r})")
        self._ready = True

    def _next_message(self, deadline: float, cancel, timeout_s: float) -> tuple:
        while True:
            # Messages first: a reply that arrived just before a death or deadline counts.
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
        self._ready = False

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


def shared_worker(device: str, ranks: int = 1) -> Worker:
    """The process-wide warm worker of a physical device (``auto``, ``cuda`` and ``cuda:0`` are
    one GPU and share one worker), or of the GPUs of a run of ``ranks`` ranks on CUDA."""
    key = ",".join(devices.device_keys(device, ranks))
    with _shared_lock:
        if key not in _shared:
            _shared[key] = Worker(devices.visible_devices_for(device, ranks))
        return _shared[key]


def close_shared_workers() -> None:
    """Stop every shared warm worker politely (a command line that is done with them): each
    exits normally, so its exit handlers end what it started, such as torch.compile's worker
    pool (killed instead, the pool's semaphores are reported leaked when the caller exits)."""
    with _shared_lock:
        workers = list(_shared.values())
        _shared.clear()
    for worker in workers:
        worker.close()


def run(config: BenchConfig, progress: ProgressFn | None = None, cancel: threading.Event | None = None,
        sweep_id: str | None = None) -> Result:
    """``Worker.run`` on the shared warm worker of the config's device; safe from many threads."""
    return shared_worker(config.device, config.nproc).run(config, progress, cancel, sweep_id)


def call(func: Callable, *args, device: str, timeout_s: float, progress: ProgressFn | None = None,
         cancel: threading.Event | None = None, fresh: bool = False, alloc_conf: str | None = None) -> Outcome:
    """``Worker.call`` on the shared warm worker of ``device``; safe from many threads."""
    return shared_worker(device).call(func, *args, device=device, timeout_s=timeout_s, progress=progress,
                                      cancel=cancel, fresh=fresh, alloc_conf=alloc_conf)
