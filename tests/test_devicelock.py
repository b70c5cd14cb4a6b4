"""device_queue: one holder per device across threads and processes, in arrival order."""
import multiprocessing
import os
import subprocess
import sys
import threading
import time

import pytest

from engine.devicelock import device_queue, lock_dir as current_lock_dir
from tests.conftest import ROOT


@pytest.fixture
def lock_dir():
    """The test's own queue directory (conftest sets it for every test)."""
    return current_lock_dir()


def _hold(device, log_path, hold_s):
    with device_queue(device):
        start = time.monotonic()
        time.sleep(hold_s)
        end = time.monotonic()
    with open(log_path, "a") as f:
        f.write(f"{start} {end}\n")


def test_two_processes_never_hold_the_same_device_at_once(tmp_path):
    log = tmp_path / "log.txt"
    ctx = multiprocessing.get_context("fork")  # inherits the env var and imports: starts instantly
    procs = [ctx.Process(target=_hold, args=("cuda:0", log, 0.3)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=30)
    assert [p.exitcode for p in procs] == [0, 0]
    (s1, e1), (s2, e2) = sorted(tuple(map(float, line.split())) for line in log.read_text().split("\n") if line)
    assert e1 <= s2, "the second process entered while the first held the device"


def test_waiters_see_their_position_and_enter_in_arrival_order():
    release = threading.Event()
    entered, positions = [], {"b": [], "c": []}

    def holder():
        with device_queue("cpu"):
            entered.append("a")
            release.wait(10)

    def waiter(name):
        with device_queue("cpu", on_wait=positions[name].append):
            entered.append(name)

    threads = [threading.Thread(target=holder)]
    threads[0].start()
    while not entered:
        time.sleep(0.01)
    for name in ("b", "c"):
        threads.append(threading.Thread(target=waiter, args=(name,)))
        threads[-1].start()
        while not positions[name]:  # queued before the next one arrives
            time.sleep(0.01)
    release.set()
    for t in threads:
        t.join(10)
    assert entered == ["a", "b", "c"]
    assert positions["b"][0] == 1 and positions["c"][0] == 2


def test_other_devices_do_not_wait():
    with device_queue("cuda:0"):
        waited = []
        with device_queue("cuda:1", on_wait=waited.append):
            pass
        assert waited == []


def test_reentrant_in_one_thread_and_cuda_means_cuda0():
    with device_queue("cuda"):
        with device_queue("cuda:0"):  # same GPU, same thread: no self-deadlock
            pass


def _die_holding(device):
    with device_queue(device):
        os._exit(0)


def test_a_dead_holder_does_not_block_the_queue(lock_dir):
    p = multiprocessing.get_context("fork").Process(target=_die_holding, args=("cpu",))
    p.start()
    p.join(10)
    assert any(name.endswith(".ticket") for name in os.listdir(lock_dir))  # left behind
    started = time.monotonic()
    with device_queue("cpu"):
        pass
    assert time.monotonic() - started < 1.0


def test_on_wait_raising_abandons_the_wait(lock_dir):
    class Cancelled(Exception):
        pass

    def cancel(position):
        raise Cancelled

    with device_queue("cpu"):
        done = []

        def other():
            with pytest.raises(Cancelled):
                with device_queue("cpu", on_wait=cancel):
                    pass
            done.append(True)

        t = threading.Thread(target=other)
        t.start()
        t.join(10)
        assert done == [True]
    assert not [name for name in os.listdir(lock_dir) if name.endswith(".ticket")]


_HOLD_DEFAULT_QUEUE = """
import sys, time
from engine.devicelock import device_queue
with device_queue("cpu"):
    print("held", flush=True)
    sys.stdin.read()  # until the test closes our stdin
"""


def test_tests_never_wait_behind_a_benchmark_holding_the_machine_wide_queue():
    # Another process (a user's benchmark) holds the default queue of this machine's CPU.
    env = {k: v for k, v in os.environ.items() if k not in ("TRADEOFF_LAB_LOCK_DIR", "TRADEOFF_LAB_DB")}
    holder = subprocess.Popen([sys.executable, "-c", _HOLD_DEFAULT_QUEUE], cwd=ROOT, env={**env, "PYTHONPATH": ROOT},
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        started = time.monotonic()
        with device_queue("cpu"):  # this test's own queue: entered at once
            waited = time.monotonic() - started
        assert waited < 1.0
    finally:
        holder.stdin.close()
        holder.wait(timeout=10)
