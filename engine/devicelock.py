"""One benchmark per device at a time, across threads and processes, in arrival order.

Two benchmarks sharing a GPU (or the CPU) disturb each other's timings and memory, so every
run waits its turn. The queue is a directory of ticket files, one per waiting or running
benchmark, each held with ``flock`` by its owner for as long as it waits or runs:

- ``<device>.queue``   a lock file that makes taking a ticket and reading the queue atomic;
- ``<device>.<ticket>.<pid>.ticket``  a waiter's (or the holder's) ticket.

The live ticket with the smallest number runs. A ticket whose ``flock`` can be taken by
someone else belongs to a process that died (the kernel drops flocks on exit), so it is
removed and never blocks the queue. ``flock`` locks belong to an open file description,
which makes them exclusive between threads of one process as well as between processes.

That same property keeps a device held while *any* process has the ticket's file open:
``device_queue`` yields the ticket's file descriptor, and the worker passes a copy of it to
the process that measures. If the caller is killed mid-run, its copy closes but the
worker's keeps the lock, so the next run waits until the orphaned worker is gone too.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import re
import tempfile
import threading
import time
from typing import Callable, Iterator

from .store import is_url

POLL_S = 0.05
_held = threading.local()  # devices the current thread holds (key -> ticket fd), for re-entrant use


def lock_dir() -> str:
    """Directory of the queue files: $TRADEOFF_LAB_LOCK_DIR, else next to $TRADEOFF_LAB_DB
    when that is a file, else the temp dir (a database on a server has no folder here)."""
    explicit = os.environ.get("TRADEOFF_LAB_LOCK_DIR")
    if explicit:
        return explicit
    db = os.environ.get("TRADEOFF_LAB_DB")
    if db and not is_url(db):
        return os.path.join(os.path.dirname(os.path.abspath(db)), "locks")
    return os.path.join(tempfile.gettempdir(), "tradeoff-lab-locks")


def _device_key(device: str) -> str:
    # "cuda" and "cuda:0" are the same GPU; the key must also be a safe file-name part.
    if device == "cuda":
        device = "cuda:0"
    return re.sub(r"[^A-Za-z0-9_.-]", "-", device)


def _try_flock(fd: int, mode: int) -> bool:
    try:
        fcntl.flock(fd, mode | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


class _Queue:
    def __init__(self, directory: str, key: str):
        self.directory = directory
        self.key = key
        self.ticket_re = re.compile(rf"^{re.escape(key)}\.(\d+)\.\d+\.ticket$")

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        fd = os.open(os.path.join(self.directory, f"{self.key}.queue"), os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing drops the lock

    def _live_tickets(self) -> list[int]:
        """Ticket numbers of live owners; removes dead owners' files. Call with the queue locked."""
        live = []
        for name in os.listdir(self.directory):
            match = self.ticket_re.match(name)
            if not match:
                continue
            path = os.path.join(self.directory, name)
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                continue
            try:
                if _try_flock(fd, fcntl.LOCK_SH):
                    os.unlink(path)  # nobody holds it: its owner died
                else:
                    live.append(int(match.group(1)))
            finally:
                os.close(fd)
        return live

    def take_ticket(self) -> tuple[int, int, str]:
        """(ticket, fd holding it, path). The fd keeps the ticket alive until closed."""
        with self._locked():
            ticket = max(self._live_tickets(), default=0) + 1
            path = os.path.join(self.directory, f"{self.key}.{ticket:012d}.{os.getpid()}.ticket")
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
            fcntl.flock(fd, fcntl.LOCK_EX)
        return ticket, fd, path

    def release(self, fd: int, path: str) -> None:
        """Give a ticket back. Under the queue lock, so no scan sees a half-removed ticket."""
        with self._locked():
            os.unlink(path)
            os.close(fd)

    def position(self, ticket: int) -> int:
        """How many live tickets are ahead of ``ticket`` (0: it is this ticket's turn)."""
        with self._locked():
            return sum(1 for other in self._live_tickets() if other < ticket)


@contextlib.contextmanager
def device_queue(device: str, on_wait: Callable[[int], None] | None = None) -> Iterator[int]:
    """Hold ``device`` exclusively for the ``with`` body, waiting in arrival order; yields
    the ticket's file descriptor (whoever holds a copy of it holds the device).

    While waiting, ``on_wait(position)`` is called about every 50 ms (position 1 = next);
    an exception raised by it abandons the wait and propagates (how callers cancel).
    Re-entrant: a thread that already holds ``device`` enters immediately.
    """
    key = _device_key(device)
    held = getattr(_held, "tickets", None)
    if held is None:
        held = _held.tickets = {}
    if key in held:
        yield held[key]
        return
    directory = lock_dir()
    os.makedirs(directory, exist_ok=True)
    queue = _Queue(directory, key)
    ticket, fd, path = queue.take_ticket()
    try:
        while (ahead := queue.position(ticket)) > 0:
            if on_wait is not None:
                on_wait(ahead)
            time.sleep(POLL_S)
        held[key] = fd
        try:
            yield fd
        finally:
            del held[key]
    finally:
        queue.release(fd, path)
