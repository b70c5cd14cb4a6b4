"""Faults lose nothing: --out and --db are checked before anything runs; a disk that fills up
mid-sweep keeps every result (on stderr as JSON) and leaves every file readable; a CLI killed
with kill -9 takes its worker with it, and the device stays locked until the worker is gone.

Sweeps here run synthetic results (``engine.sweep.run`` replaced): what is tested is where
results go, and exact result sizes make the full-disk cases deterministic.
"""
import contextlib
import ctypes
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time

import pytest

from engine import cli
from engine import worker as worker_module
from engine.devicelock import device_queue
from engine.results import Result, read_results
from engine.store import Store
from tests.conftest import ROOT
from tests.factories import make_result

TINY = ["--model", "gpt-tiny", "--set", "n_layers=1", "--set", "seq_len=16", "--set", "d_model=32", "--set",
        "n_heads=2", "--set", "vocab=64", "--warmup", "1", "--steps", "2", "--device", "cpu"]
PAGE = 4096
RESULT_BYTES = 3000  # each synthetic result line: one fits a free page, two do not


@pytest.fixture
def no_worker(monkeypatch):
    """Fails the test if a worker process is started or a benchmark is run."""
    def refuse(*args, **kwargs):
        raise AssertionError("a worker was started or a benchmark run")

    monkeypatch.setattr(worker_module.Worker, "_spawn", refuse)
    monkeypatch.setattr(worker_module.Worker, "start", refuse)
    monkeypatch.setattr(worker_module, "run", refuse)
    monkeypatch.setattr(worker_module.Worker, "run", refuse)


def _sized(result: Result, size: int) -> Result:
    """``result`` padded with a warning so that its JSON line is exactly ``size`` bytes."""
    padded = result.replace(warnings=("",))
    return padded.replace(warnings=("x" * (size - len(padded.to_json()) - 1),))


@pytest.fixture
def fake_runs(monkeypatch):
    """Sweeps produce synthetic ok results of RESULT_BYTES bytes; returns the batches run."""
    ran = []

    def fake_run(self, config, progress=None, cancel=None, sweep_id=None, device=None):
        ran.append(config.batch)
        result = make_result(**{k: v for k, v in config.to_dict().items() if k != "device"}).replace(sweep_id=sweep_id)
        return _sized(result, RESULT_BYTES)

    monkeypatch.setattr(worker_module.Worker, "run", fake_run)
    monkeypatch.setattr(worker_module.Worker, "start", lambda self: None)
    return ran


def _stderr_results(err: str) -> list[Result]:
    return [Result.from_dict(json.loads(line), "stderr") for line in err.splitlines() if line.startswith("{")]


# ------------------------------------------------------------------------- checked first
def _damaged_db(path) -> str:
    store = Store(path)
    store.add_many([make_result(batch=b) for b in range(1, 40)])
    with open(path, "r+b") as f:  # a valid header, trashed pages
        f.seek(2 * PAGE)
        f.write(os.urandom(4 * PAGE))
    return str(path)


@pytest.mark.parametrize("flags, phrase", [
    (["--out", "{tmp}"], "--out: {tmp} is a directory, not a file"),
    (["--out", "/proc/version"], "--out: /proc/version: cannot write there"),
    (["--out", ""], "--out: the path is empty"),
    (["--db", ""], "--db: the path is empty"),
    (["--db", "{tmp}"], "--db: {tmp} is a directory"),
    (["--db", "{damaged}"], "damaged.sqlite: the results database is damaged (SQLite quick_check:"),
    (["--db", "{not_db}"], "not.sqlite: cannot open the results database"),
])
@pytest.mark.parametrize("command", ["run", "sweep"])
def test_a_bad_out_or_db_fails_before_anything_runs(command, flags, phrase, tmp_path, no_worker, capsys):
    not_db = tmp_path / "not.sqlite"
    not_db.write_bytes(os.urandom(8192))
    names = {"tmp": str(tmp_path), "damaged": _damaged_db(tmp_path / "damaged.sqlite"), "not_db": str(not_db)}
    flags = [flag.format(**names) for flag in flags]
    assert cli.main([command, *TINY, *flags]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and phrase.format(**names) in err, err


def test_a_damaged_database_is_one_message_for_every_command(tmp_path, capsys):
    damaged = _damaged_db(tmp_path / "damaged.sqlite")
    for args in (["list", "--db", damaged], ["recommend", "--db", damaged, "--effective-batch", "2",
                                               "--memory-budget-gib", "1"]):
        assert cli.main(args) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "damaged.sqlite: cannot read the results database" in err, err


def test_out_needs_no_existing_file_and_a_failed_check_leaves_none(tmp_path, fake_runs, capsys):
    out = tmp_path / "new" / "runs.jsonl"
    assert cli.main(["sweep", *TINY, "--batch", "1,2", "--out", str(out)]) == 0
    assert [r.config.batch for r in read_results(out)] == [1, 2] == fake_runs
    # /dev/full takes no write: refused before the run, and nothing is created anywhere.
    assert cli.main(["sweep", *TINY, "--batch", "1", "--out", "/dev/full"]) == 2
    assert "--out: /dev/full: cannot write there (No space left on device)" in capsys.readouterr().err
    assert fake_runs == [1, 2]


# ------------------------------------------------------------------------- a full disk
@pytest.fixture
def small_disk(tmp_path):
    """A 256 KiB tmpfs (the test must be able to mount one: CI runs as root)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(disk)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {mounted.stderr.strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def _fill(disk, leave_pages: int) -> None:
    """Fill ``disk`` until ``leave_pages`` pages are free."""
    with open(disk / "filler", "wb", buffering=0) as f:
        with contextlib.suppress(OSError):
            while True:
                f.write(b"\0" * PAGE)
    size = os.path.getsize(disk / "filler")
    os.truncate(disk / "filler", max(0, size - leave_pages * PAGE))
    assert os.statvfs(disk).f_bavail == leave_pages


def test_disk_full_mid_sweep_with_out_loses_no_result(small_disk, fake_runs, capsys):
    out = small_disk / "runs.jsonl"
    out.write_bytes(b"")
    _fill(small_disk, leave_pages=1)
    assert cli.main(["sweep", *TINY, "--batch", "1,2,3", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert fake_runs == [1, 2]  # stopped at the failure: batch 3 never ran
    stored = read_results(out)  # readable: the second line's partial write was taken back
    assert [r.config.batch for r in stored] == [1] and stored.notes == ()
    assert [r.config.batch for r in _stderr_results(err)] == [2]  # the unsaved result, in full
    assert f"could not save the result ({out}: No space left on device)" in err
    assert "Traceback" not in err


def test_disk_full_mid_sweep_with_db_loses_no_result(small_disk, tmp_path, fake_runs, capsys):
    db, out = small_disk / "runs.sqlite", tmp_path / "runs.jsonl"
    Store(db)
    # Hold the database open with an empty log, so only storing a run needs new pages.
    holder = sqlite3.connect(db)
    holder.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    try:
        _fill(small_disk, leave_pages=1)
        assert cli.main(["sweep", *TINY, "--batch", "1,2", "--db", str(db), "--out", str(out)]) == 1
    finally:
        holder.close()
    err = capsys.readouterr().err
    assert fake_runs == [1]
    assert [r.config.batch for r in read_results(out)] == [1]  # saved where it could be
    assert [r.config.batch for r in _stderr_results(err)] == [1]
    assert f"{db}: cannot store the run(s) (database or disk is full)" in err
    assert "Traceback" not in err
    os.unlink(small_disk / "filler")
    assert Store(db).count() == 0 and Store(db).unreadable() == []  # the database is intact


def test_a_full_disk_is_refused_before_the_run(small_disk, no_worker, capsys):
    _fill(small_disk, leave_pages=0)
    assert cli.main(["run", *TINY, "--out", str(small_disk / "runs.jsonl")]) == 2
    assert "no space left on its disk" in capsys.readouterr().err


# ------------------------------------------------------------------------- a killed caller
def _children(pid: int) -> list[int]:
    found = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            found += [int(child) for child in f.read().split()]
    return found


def _worker_of(pid: int) -> int:
    """``pid``'s worker process: a child of its fork server (itself one of ``pid``'s children,
    beside multiprocessing's resource tracker)."""
    for child in _children(pid):
        with open(f"/proc/{child}/cmdline", "rb") as f:
            if b"forkserver" in f.read():
                workers = _children(child)
                if workers:
                    return workers[0]
    raise AssertionError(f"process {pid} has no worker")


def _gone(pid: int) -> bool:
    """Whether ``pid`` has exited (a zombie nobody reaped counts: it runs nothing)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


def _kill_if_running(pid: int) -> None:
    """Clean up after a failed check: kill ``pid`` if it still runs."""
    if not _gone(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _wait_gone(pid: int, within_s: float) -> None:
    started = time.monotonic()
    while not _gone(pid):
        assert time.monotonic() - started < within_s, f"process {pid} still runs after {within_s} s"
        time.sleep(0.02)


def marks_then_hangs():
    """A user model whose forward creates the file $TRADEOFF_LAB_TEST_MARKER and then sleeps
    for an hour: once the file exists, the worker computes with no progress left to send."""
    import torch

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(4, 1)

        def forward(self, x):
            open(os.environ["TRADEOFF_LAB_TEST_MARKER"], "w").close()
            time.sleep(3600)
            return self.fc(x).sum()

    return Model(), lambda batch_size, device: (torch.randn(batch_size, 4, device=device),)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_kill_9_of_the_cli_mid_run_takes_its_worker_with_it(tmp_path):
    marker = tmp_path / "in-forward"
    proc = subprocess.Popen([sys.executable, "-m", "engine", "run", "--model", "tests.test_faults:marks_then_hangs",
                             "--device", "cpu", "--warmup", "1", "--steps", "2", "--force"], cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": ROOT, "TRADEOFF_LAB_TEST_MARKER": str(marker)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():  # the worker is inside forward, sending nothing
            assert time.monotonic() < deadline and proc.poll() is None, "the run never reached its forward"
            time.sleep(0.02)
        worker = _worker_of(proc.pid)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        try:
            _wait_gone(worker, within_s=2.0)
        finally:
            _kill_if_running(worker)  # never leave an hour-long sleeper behind
    finally:
        if proc.poll() is None:
            proc.kill()


def outlive_parent(ready_path: str, quiet_s: float, channel) -> None:
    """Runs in the worker: stops the kernel from killing it with its parent, says it started,
    computes quietly for ``quiet_s``, writes when that ended, then reports progress (which
    finds the pipe broken once the parent is gone, and ends the process)."""
    ctypes.CDLL(None).prctl(1, 0)  # PR_SET_PDEATHSIG 0: only the other two safeguards remain
    with open(ready_path, "w") as f:
        f.write(str(os.getpid()))
    time.sleep(quiet_s)
    with open(ready_path + ".quiet-end", "w") as f:
        f.write(repr(time.time()))
    from engine.progress import Progress

    for _ in range(600):
        channel.progress(Progress("measure", 1, 1))
        time.sleep(0.05)


_CALLER = """
import sys
from engine.worker import Worker
from tests.test_faults import outlive_parent
Worker().call(outlive_parent, sys.argv[1], 1.0, device="cpu", timeout_s=120)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl and /proc are Linux")
def test_an_orphaned_worker_keeps_the_device_locked_until_it_is_gone_and_ends_at_its_next_step(tmp_path):
    ready = tmp_path / "ready"
    caller = subprocess.Popen([sys.executable, "-c", _CALLER, str(ready)], cwd=ROOT,
                              env={**os.environ, "PYTHONPATH": ROOT})
    try:
        deadline = time.monotonic() + 60
        while not ready.exists() or not ready.read_text():
            assert time.monotonic() < deadline and caller.poll() is None, "the worker never started"
            time.sleep(0.02)
        orphan = int(ready.read_text())
        caller.send_signal(signal.SIGKILL)
        caller.wait(10)
        with device_queue("cpu"):  # a second run waits for the device here
            entered = time.time()
        quiet_end = float((tmp_path / "ready.quiet-end").read_text())
        assert entered >= quiet_end, "the next run got the device while the orphan still computed"
        try:
            _wait_gone(orphan, within_s=2.0)  # its first progress message found the pipe broken
        finally:
            _kill_if_running(orphan)
    finally:
        if caller.poll() is None:
            caller.kill()


def _pid(channel) -> int:
    return os.getpid()


def test_a_worker_started_from_a_thread_that_ends_stays_warm():
    # The parent-death signal follows the thread that started a process: a dashboard's
    # script thread ends after every rerun, and its warm worker must not die with it.
    worker = worker_module.Worker()
    try:
        first = []
        thread = threading.Thread(target=lambda: first.append(worker.call(_pid, device="cpu", timeout_s=60)))
        thread.start()
        thread.join()
        time.sleep(0.2)
        second = worker.call(_pid, device="cpu", timeout_s=60)
        assert first[0].ok and second.ok and first[0].value == second.value  # the same process
    finally:
        worker.close()
