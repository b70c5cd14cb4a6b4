"""Sweeps over every device of a box: one lane (warm worker and queue) per GPU, configs run
at once on different lanes, results stream in finishing order, failures stay in their lane.

No GPU here: the lanes are stand-ins. Real CPU workers queued under fake GPU keys prove the
concurrency of real worker processes; stub runners prove routing and ordering without
processes.
"""
from __future__ import annotations

import dataclasses
import os
import random
import shutil
import threading

import pytest

from engine import devices, worker
from engine.config import BenchConfig
from engine.dispatch import Lane, LocalExecutor, local_lanes
from engine.results import Result
from engine.sweep import expand, run_sweep
from engine.worker import Worker
from tests.dispatch_models import rendezvous_dir
from tests.factories import CPU_ENV, assert_valid, make_result

WAIT_S = 30


def fake_gpu_lanes(count: int = 2) -> list[Lane]:
    """``count`` "GPUs" that are CPU workers, each with its own queue, taking any-GPU configs."""
    return [Lane(f"GPU-fake-{i}", "cpu", Worker(queue_key=f"GPU-fake-{i}"), any_gpu=True) for i in range(count)]


def test_two_lanes_run_at_once_and_an_oom_leaves_the_other_alone():
    seed = random.randrange(2**40)
    configs, _ = expand({"model": "tests.dispatch_models:rendezvous_oom_above_2", "device": "auto", "warmup": 1,
                         "steps": 2, "seed": seed}, {"batch": [1, 4]})
    lanes = fake_gpu_lanes()
    try:
        seen = []
        results = run_sweep(configs, on_result=seen.append, executor=LocalExecutor(lambda _: lanes))
        # Both passed the rendezvous (else "the other run never arrived"): they ran at once.
        by_batch = {r.config.batch: r for r in results}
        assert by_batch[1].status == "ok", by_batch[1].error
        assert by_batch[4].status == "oom" and "micro-batch 4 > 2" in by_batch[4].error
        assert seen == results and len({r.sweep_id for r in results}) == 1
        for result in results:
            assert_valid(result)
            assert result.config.device == "auto"  # the config stays what was asked for
        # Two different processes met; the one that ran the ok config is still the warm worker
        # of its lane (the OOM only replaced its own lane's process).
        met = {int(name) for name in os.listdir(rendezvous_dir(seed))}
        alive = {lane.runner.pid for lane in lanes} - {None}
        assert len(met) == 2 and len(alive & met) == 1
    finally:
        for lane in lanes:
            lane.runner.close()
        shutil.rmtree(rendezvous_dir(seed), ignore_errors=True)


@dataclasses.dataclass
class StubRunner:
    """Runs nothing: records each call, optionally waits for ``gate`` first, and returns a
    result whose environment names this stub's GPU, as a worker pinned to it would."""

    key: str
    calls: list = dataclasses.field(default_factory=list)
    gate: threading.Event | None = None
    on_call: object = None

    def run(self, config, progress, cancel, sweep_id, device=None):
        self.calls.append((config, device))
        if progress is not None:
            from engine.progress import Progress
            progress(Progress("measure", step=1, total=1))
        if self.on_call is not None:
            self.on_call(self, cancel)
        if self.gate is not None and not self.gate.wait(WAIT_S):
            return make_result("error", sweep_id=sweep_id, batch=config.batch)
        status = "cancelled" if cancel.is_set() else "ok"
        env = dataclasses.replace(CPU_ENV, device_type="cuda", gpu_uuid=self.key)
        result = make_result(status, env=env, sweep_id=sweep_id, batch=config.batch)
        return result.replace(config=config)


def stub_lanes(*runners: StubRunner) -> list[Lane]:
    return [Lane(runner.key, f"cuda:{i}", runner, any_gpu=True) for i, runner in enumerate(runners)]


def test_explicit_gpus_go_to_their_lane_and_results_stream_in_finishing_order():
    first_delivered = threading.Event()
    gpu0, gpu1 = StubRunner("GPU-0"), StubRunner("GPU-1")
    gpu1.gate = first_delivered  # the cuda:1 run finishes only once another result has been handed over
    configs = [BenchConfig(device=device, batch=batch) for device, batch in
               (("cuda:1", 1), ("cuda:0", 2), ("cuda", 3), ("auto", 4))]
    seen: list[Result] = []

    def on_result(result: Result) -> None:
        seen.append(result)
        first_delivered.set()

    results = run_sweep(configs, on_result=on_result, executor=LocalExecutor(lambda _: stub_lanes(gpu0, gpu1)))
    assert seen == results and all(r.ok for r in results)
    assert results[0].config.batch != 1  # the first config of the sweep was not the first to finish
    lane_of = {r.config.batch: r.env.gpu_uuid for r in results}
    assert lane_of[1] == "GPU-1" and lane_of[2] == "GPU-0"  # cuda:N goes to GPU N
    assert lane_of[3] and lane_of[4]  # any GPU: whichever lane was free
    # A lane runs its configs on its own device; the config keeps what was asked for.
    assert {device for _, device in gpu0.calls} == {"cuda:0"} and {device for _, device in gpu1.calls} <= {"cuda:1"}
    assert sorted(r.config.device for r in results) == ["auto", "cuda", "cuda:0", "cuda:1"]


def test_progress_names_each_config_of_the_sweep():
    events = []
    configs = [BenchConfig(device="cuda", batch=b) for b in (1, 2, 3)]
    run_sweep(configs, events.append, executor=LocalExecutor(lambda _: stub_lanes(StubRunner("A"), StubRunner("B"))))
    assert sorted(e.index for e in events) == [1, 2, 3] and {e.count for e in events} == {3}


def test_a_cpu_run_never_shares_the_host_with_a_gpu_run():
    active: set[str] = set()
    lock = threading.Lock()
    seen_by_cpu = []
    both_gpus = threading.Barrier(2, timeout=WAIT_S)

    def enter(runner, cancel):
        with lock:
            if runner.key == "cpu":
                seen_by_cpu.append(set(active))
            active.add(runner.key)

    def gpu_enter(runner, cancel):
        enter(runner, cancel)
        both_gpus.wait()  # the two GPU lanes do run at once
        with lock:
            active.discard(runner.key)

    gpu0, gpu1 = StubRunner("GPU-0", on_call=gpu_enter), StubRunner("GPU-1", on_call=gpu_enter)
    cpu = StubRunner("cpu", on_call=enter)
    lanes = stub_lanes(gpu0, gpu1) + [Lane("cpu", "cpu", cpu, exclusive=True)]
    configs = [BenchConfig(device="cpu", batch=1), BenchConfig(device="cuda:0", batch=2),
               BenchConfig(device="cuda:1", batch=3)]
    results = run_sweep(configs, executor=LocalExecutor(lambda _: lanes))
    assert len(results) == 3 and seen_by_cpu == [set()]


def test_a_config_for_a_missing_gpu_is_an_error_result():
    configs = [BenchConfig(device="cuda:5"), BenchConfig(device="cuda:0", batch=2)]
    results = run_sweep(configs, executor=LocalExecutor(lambda _: stub_lanes(StubRunner("GPU-0"))))
    by_device = {r.config.device: r for r in results}
    assert by_device["cuda:0"].ok
    assert by_device["cuda:5"].status == "error" and "no device cuda:5" in by_device["cuda:5"].error
    assert_valid(by_device["cuda:5"])


def test_cancel_ends_the_running_configs_and_starts_no_more():
    cancel = threading.Event()
    started = []

    def wait_for_stop(runner, stop):
        started.append(runner.key)
        cancel.set()
        stop.wait(WAIT_S)

    runners = [StubRunner("GPU-0", on_call=wait_for_stop), StubRunner("GPU-1", on_call=wait_for_stop)]
    configs = [BenchConfig(device="cuda", batch=b) for b in range(1, 7)]
    results = run_sweep(configs, cancel=cancel, executor=LocalExecutor(lambda _: stub_lanes(*runners)))
    assert 1 <= len(results) == len(started) <= 2
    assert all(r.status == "cancelled" for r in results)


def test_a_failing_callback_stops_the_sweep_after_its_running_configs_ended():
    started, ended = threading.Event(), threading.Event()

    def slow(runner, stop):
        if runner.key == "GPU-0":
            started.wait(WAIT_S)  # finishes once the other lane is running
            return
        started.set()
        assert stop.wait(WAIT_S)  # stopped by the caller's failure, not by its time running out
        ended.set()

    def on_result(result):
        raise OSError("disk full")

    runners = [StubRunner("GPU-0", on_call=slow), StubRunner("GPU-1", on_call=slow)]
    configs = [BenchConfig(device="cuda:0"), BenchConfig(device="cuda:1")]
    with pytest.raises(OSError, match="disk full"):
        run_sweep(configs, on_result=on_result, executor=LocalExecutor(lambda _: stub_lanes(*runners)))
    assert ended.is_set()


def test_local_lanes_one_per_gpu_keyed_by_uuid(monkeypatch):
    gpus = (devices.CudaGpu(0, "GPU-aaa", "Fake GPU", 80 * 2**30), devices.CudaGpu(1, "GPU-bbb", "Fake GPU", 80 * 2**30))
    monkeypatch.setattr(devices, "cuda_gpus", lambda: gpus)
    monkeypatch.setattr(worker, "_shared", {})
    lanes = local_lanes([BenchConfig(device="auto"), BenchConfig(device="cuda:1"), BenchConfig(device="cpu")])
    assert [(lane.key, lane.device, lane.any_gpu, lane.exclusive) for lane in lanes] == [
        ("GPU-aaa", "cuda:0", True, False), ("GPU-bbb", "cuda:1", True, False), ("cpu", "cpu", False, True)]
    # Each GPU lane's worker is the shared warm worker of that GPU, which sees only it.
    assert lanes[1].runner is worker.shared_worker("cuda:1") is not lanes[0].runner
    assert lanes[1].runner._visible_devices == "GPU-bbb"


def test_a_data_parallel_run_holds_its_gpus_alone_on_a_lane_of_its_own(monkeypatch):
    gpus = tuple(devices.CudaGpu(i, f"GPU-{c}", "Fake GPU", 80 * 2**30) for i, c in enumerate("abc"))
    monkeypatch.setattr(devices, "cuda_gpus", lambda: gpus)
    monkeypatch.delenv(devices.PINNED_ENV, raising=False)
    monkeypatch.setattr(worker, "_shared", {})
    ddp = BenchConfig(device="cuda:1", nproc=2, parallel="ddp")
    single, cpu_ranks = BenchConfig(device="cuda"), BenchConfig(device="cpu", nproc=2, parallel="ddp")
    lanes = local_lanes([ddp, single, cpu_ranks])
    ranks_lane = lanes[-1]
    assert (ranks_lane.key, ranks_lane.device, ranks_lane.exclusive, ranks_lane.gpus) == ("GPU-b,GPU-c", "cuda:1", True, 2)
    assert ranks_lane.runner._visible_devices == "GPU-b,GPU-c"  # its worker sees both of its GPUs
    assert [lane.key for lane in lanes if lane.takes(ddp)] == ["GPU-b,GPU-c"]
    assert [lane.key for lane in lanes if lane.takes(single)] == ["GPU-a", "GPU-b", "GPU-c"]
    assert [lane.key for lane in lanes if lane.takes(cpu_ranks)] == ["cpu"]  # CPU ranks share the host


def test_a_data_parallel_run_never_overlaps_a_single_gpu_run():
    runners = StubRunner("GPU-0"), StubRunner("GPU-1"), StubRunner("GPU-0,GPU-1")
    running, overlaps = set(), []
    guard = threading.Lock()

    def watched(runner: StubRunner):
        plain = runner.run

        def run(config, progress, cancel, sweep_id, device=None):
            with guard:
                if running:
                    overlaps.append((runner.key, set(running)))
                running.add(runner.key)
            try:
                threading.Event().wait(0.05)  # long enough for another lane to start if it may
                return plain(config, progress, cancel, sweep_id, device)
            finally:
                with guard:
                    running.discard(runner.key)
        runner.run = run

    for runner in runners:
        watched(runner)
    lanes = stub_lanes(*runners[:2]) + [Lane(runners[2].key, "cuda:0", runners[2], exclusive=True, gpus=2)]
    configs = [BenchConfig(device="cuda", batch=1), BenchConfig(device="cuda:0", nproc=2, parallel="ddp", batch=2),
               BenchConfig(device="cuda", batch=3), BenchConfig(device="cuda", batch=4)]
    results = run_sweep(configs, executor=LocalExecutor(lambda _: lanes))
    assert sorted(r.config.batch for r in results) == [1, 2, 3, 4]
    assert not [o for o in overlaps if "GPU-0,GPU-1" in {o[0], *o[1]}]
    assert [call for call in runners[2].calls] and all(device == "cuda:0" for _, device in runners[2].calls)


def test_one_device_means_one_lane_in_sweep_order(monkeypatch):
    monkeypatch.setattr(devices, "cuda_gpus", lambda: ())
    lanes = local_lanes([BenchConfig(device="auto"), BenchConfig(device="cpu")])
    assert [(lane.key, lane.device) for lane in lanes] == [("cpu", "cpu")]
    runner = StubRunner("cpu")
    configs = [BenchConfig(device="cpu", batch=b) for b in (3, 1, 2)]
    results = run_sweep(configs, executor=LocalExecutor(lambda _: [Lane("cpu", "cpu", runner, exclusive=True)]))
    assert [r.config.batch for r in results] == [3, 1, 2]


def test_a_run_that_died_before_reporting_still_names_its_gpu():
    # This machine has no CUDA: the worker fails before it can report the environment, and
    # the caller's stand-in still says which GPU (the lane's UUID) the run was for.
    runner = Worker(queue_key="GPU-fake-9")
    try:
        result = runner.run(BenchConfig(device="cuda:0", warmup=1, steps=1), device="cuda:0")
    finally:
        runner.close()
    assert result.status == "error"
    assert (result.env.device_type, result.env.gpu_uuid) == ("cuda", "GPU-fake-9")
    assert_valid(result)
