"""The worker process: warm reuse, and every way a run can fail without harming the caller.

All runs go through the real ``engine.measure.run_benchmark`` in the child process.
"""
import os
import resource
import signal
import threading
import time

import pytest

from engine import BenchConfig
from engine.worker import Worker, _cpu_memory_cap
from tests.factories import assert_valid

TINY_DIMS = {"n_layers": 2, "seq_len": 32, "d_model": 64, "n_heads": 2, "vocab": 256}
TINY = BenchConfig(model="gpt-tiny", overrides=TINY_DIMS, batch=2, warmup=1, steps=2, device="cpu")


def helper(name: str, **fields) -> BenchConfig:
    return BenchConfig(**{"model": f"tests.helper_models:{name}", "batch": 2, "warmup": 1, "steps": 2, "device": "cpu", **fields})


@pytest.fixture(scope="module")
def worker():
    w = Worker()
    yield w
    w.close()


def _ok(worker, config=TINY):
    result = worker.run(config)
    assert result.status == "ok", result.error
    return result


def test_warm_worker_is_reused_and_forwards_progress(worker):
    events = []
    first = worker.run(TINY, events.append)
    pid = worker.pid
    second = worker.run(TINY)
    assert first.status == second.status == "ok"
    assert worker.pid == pid is not None  # the same process ran both configs
    assert pid != os.getpid()
    assert_valid(first)
    assert first.metrics.step_ms.median > 0
    measured = [e for e in events if e.phase == "measure"]
    assert measured and measured[-1].total == TINY.steps
    assert first.env.device_type == "cpu"


def test_worker_that_exits_gives_error_and_the_next_config_gets_a_fresh_worker(worker):
    _ok(worker)
    before = worker.pid
    result = worker.run(helper("exits"))
    assert result.status == "error"
    assert result.error == "worker died: exit code 3"
    assert result.metrics.step_ms is None and result.metrics.effective_batch == 2
    assert_valid(result)
    assert worker.pid is None
    _ok(worker)
    assert worker.pid not in (None, before)


def test_worker_killed_by_a_signal_names_it(worker):
    def kill_on_first_event(event):
        if event.phase == "build":
            os.kill(worker.pid, signal.SIGKILL)

    result = worker.run(helper("hangs"), kill_on_first_event)
    assert result.status == "error"
    assert result.error.startswith("worker died: killed by signal SIGKILL")


def test_hang_past_the_timeout_is_killed(worker):
    started = []  # when the child began the run (the clock excludes starting a worker)
    result = worker.run(helper("hangs", timeout_s=1.0), lambda event: started.append(time.monotonic()))
    assert result.status == "timeout"
    assert "timed out after 1 s" in result.error
    assert 0.9 < time.monotonic() - started[0] < 4
    assert worker.pid is None


def test_cancel_stops_a_running_config(worker):
    cancel = threading.Event()
    result = worker.run(helper("hangs"), lambda event: cancel.set(), cancel)
    assert result.status == "cancelled"
    assert_valid(result)
    assert worker.pid is None


def test_cancel_before_start_runs_nothing():
    idle = Worker()
    cancel = threading.Event()
    cancel.set()
    result = idle.run(TINY, cancel=cancel)
    assert result.status == "cancelled" and idle.pid is None


def test_oom_exception_is_a_result_and_the_worker_is_replaced(worker):
    pids = []
    result = worker.run(helper("oom_above_2", batch=4), lambda event: pids.append(worker.pid))
    assert result.status == "oom"
    assert "OutOfMemoryError" in result.error
    _ok(worker)
    assert worker.pid != pids[0]


def test_cpu_memory_cap_gives_oom_and_a_warm_worker_gets_its_limit_back(worker):
    _ok(worker, TINY.replace(memory_cap_gib=0.5))
    pid = worker.pid
    # 1 GiB is past the 0.5 GiB cap of the previous run: this only works if it was lifted.
    _ok(worker, helper("big_alloc"))
    assert worker.pid == pid
    result = worker.run(helper("big_alloc", memory_cap_gib=0.25))
    assert result.status == "oom"
    assert "peak tensor memory 1.000 GiB exceeds the CPU memory cap of 0.25 GiB" in result.error
    # Far past the cap, the address-space guard stops the allocation itself.
    result = worker.run(helper("huge_alloc", memory_cap_gib=0.25))
    assert result.status == "oom"
    assert "can't allocate memory" in result.error and "CPU memory cap: 0.25 GiB" in result.error


def test_a_cpu_cap_means_the_peak_the_run_reports(worker):
    # The cap and the reported peak are one figure: a cap just above a run's peak lets it
    # run, just below it is out of memory.
    peak = _ok(worker, TINY).metrics.peak_allocated_bytes
    assert _ok(worker, TINY.replace(memory_cap_gib=peak * 1.02 / 2**30)).metrics.peak_allocated_bytes == peak
    below = worker.run(TINY.replace(memory_cap_gib=peak * 0.98 / 2**30))
    assert below.status == "oom" and "exceeds the CPU memory cap" in below.error


def test_memory_cap_context_restores_the_soft_limit():
    before = resource.getrlimit(resource.RLIMIT_AS)
    with _cpu_memory_cap(TINY.replace(memory_cap_gib=0.25), "cpu"):
        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        assert soft != resource.RLIM_INFINITY and hard == before[1]
    assert resource.getrlimit(resource.RLIMIT_AS) == before


def test_a_raising_progress_callback_kills_the_run_and_propagates(worker):
    class Stop(Exception):
        pass

    def stop(event):
        raise Stop

    with pytest.raises(Stop):
        worker.run(helper("hangs"), stop)
    assert worker.pid is None


def _square(value, channel):
    return value * value


def _raise_oom(channel):
    raise MemoryError("no room")


def test_a_decision_tool_runs_in_the_same_warm_worker_and_fails_as_an_outcome(worker):
    _ok(worker)
    pid = worker.pid
    outcome = worker.call(_square, 7, device="cpu", timeout_s=30)
    assert outcome.ok and outcome.value == 49 and worker.pid == pid
    failed = worker.call(_raise_oom, device="cpu", timeout_s=30)
    assert (failed.status, failed.error) == ("oom", "MemoryError: no room") and worker.pid is None
    fresh = worker.call(_square, 3, device="cpu", timeout_s=30, fresh=True)
    assert fresh.value == 9 and worker.pid is not None
    again = worker.pid
    assert worker.call(_square, 2, device="cpu", timeout_s=30, fresh=True).value == 4
    assert worker.pid != again  # a tool that needs an untouched process gets one
