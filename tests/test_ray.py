"""Sweeps through Ray (``--executor ray``): one Ray task per configuration, run through the
worker isolation, results in the same schema and the same store, failures isolated.

A private Ray of two CPUs (no dashboard, its files under this module's temp dir) is started
once for the module. The GPU requests are checked against a stand-in for Ray.
"""
from __future__ import annotations

import dataclasses
import importlib
import os
import random
import shutil
import socket
import sys
import tempfile
import threading

import pytest

from engine import ray_executor, worker
from engine.cli import main
from engine.config import BenchConfig, gpus_needed
from engine.ray_executor import RayExecutor
from engine.results import decode_results
from engine.store import Store
from engine.sweep import expand, run_sweep
from tests.dispatch_models import rendezvous_dir
from tests.factories import assert_valid, make_result

TINY = ["--model", "gpt-tiny", "--set", "n_layers=1", "--set", "seq_len=16", "--warmup", "1", "--steps", "1",
        "--device", "cpu"]


@pytest.fixture(scope="module")
def local_ray(tmp_path_factory):
    """A Ray of two CPUs on this machine for this module; its workers use the module's own
    device queue directory (they start with the environment Ray was started with)."""
    import ray

    base = tmp_path_factory.mktemp("ray")
    # Ray's socket paths must stay under the kernel's 107 characters.
    temp = str(base) if len(str(base)) <= 40 else tempfile.mkdtemp(prefix="tl-ray-")
    executor = RayExecutor(num_cpus=2, _temp_dir=temp,
                           runtime_env={"env_vars": {"TRADEOFF_LAB_LOCK_DIR": str(base / "locks")}})
    executor.connect()
    yield executor
    ray.shutdown()


def test_a_cli_sweep_through_ray_lands_in_the_database(local_ray, tmp_path, capsys):
    db = str(tmp_path / "runs.sqlite")
    code = main(["sweep", *TINY, "--batch", "1,2,3,4", "--executor", "ray", "--db", db, "--json"])
    out = capsys.readouterr().out
    assert code == 0
    printed = decode_results(out.encode(), "stdout")  # the same schema, read by the same reader
    assert sorted(r.config.batch for r in printed) == [1, 2, 3, 4] and all(r.ok for r in printed)
    stored = Store(db).list()
    assert {r.id for r in stored} == {r.id for r in printed}
    assert len({r.sweep_id for r in stored}) == 1
    for result in stored:
        assert_valid(result)
        assert result.metrics.step_ms.median > 0 and result.env.device_type == "cpu"


def test_a_failing_configuration_is_a_result_and_the_others_succeed(local_ray):
    base = {"model": "gpt-tiny", "overrides": {"n_layers": 1, "seq_len": 16}, "warmup": 1, "steps": 1, "device": "cpu"}
    configs, _ = expand(base, {"memory_cap_gib": [None, 1e-6]})
    seen = []
    results = run_sweep(configs, on_result=seen.append, executor=local_ray)
    assert seen == results
    by_cap = {r.config.memory_cap_gib: r for r in results}
    assert by_cap[None].status == "ok", by_cap[None].error
    assert by_cap[1e-6].status == "oom" and by_cap[1e-6].metrics.step_ms is None
    for result in results:
        assert_valid(result)


def test_tasks_on_one_machine_wait_in_its_device_queue(local_ray):
    # Ray runs both tasks at once (two CPUs), each in its own worker: only the machine's
    # device queue keeps their runs apart.
    seed = random.randrange(2**40)
    configs, _ = expand({"model": "tests.dispatch_models:alone", "device": "cpu", "warmup": 1, "steps": 1,
                         "seed": seed}, {"batch": [1, 2]})
    try:
        results = run_sweep(configs, executor=local_ray)
        assert [r.status for r in results] == ["ok", "ok"], [r.error for r in results]
        assert sorted(os.listdir(rendezvous_dir(seed))) == ["done-1", "done-2"]
    finally:
        shutil.rmtree(rendezvous_dir(seed), ignore_errors=True)


def test_a_cancel_stops_running_and_waiting_tasks(local_ray):
    # Each run would hang for an hour: the sweep returns only because its tasks were stopped.
    configs, _ = expand({"model": "tests.helper_models:hangs", "device": "cpu", "warmup": 1, "steps": 1},
                        {"batch": [1, 2, 3]})
    cancel = threading.Event()
    timer = threading.Timer(2, cancel.set)
    timer.start()
    results = run_sweep(configs, cancel=cancel, executor=local_ray)
    timer.cancel()
    assert sorted(r.config.batch for r in results) == [1, 2, 3]
    assert {r.status for r in results} == {"cancelled"}


def test_without_ray_the_executor_is_one_line_saying_how_to_install(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray now fails
    assert main(["sweep", *TINY, "--batch", "1,2", "--executor", "ray"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "pip install -r requirements-ray.txt" in err


def test_an_address_nobody_answers_at_is_one_line_at_once(capsys):
    with socket.socket() as probe:  # a port that was just free: nothing listens there
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    assert main(["sweep", *TINY, "--batch", "1,2", "--executor", "ray", "--ray-address", f"ray://127.0.0.1:{port}"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and f"cannot reach Ray at ray://127.0.0.1:{port}" in err


def test_ray_address_needs_the_ray_executor(capsys):
    assert main(["sweep", *TINY, "--batch", "1,2", "--ray-address", "auto"]) == 2
    assert "--executor ray" in capsys.readouterr().err


@dataclasses.dataclass
class FakeRay:
    """What the executor uses of Ray: records each task's options; a task "runs" when it is
    fetched, through the task function itself with a stub worker."""

    gpus: float
    options: list = dataclasses.field(default_factory=list)

    class exceptions:
        RayError = RuntimeError

    def is_initialized(self):
        return True

    def nodes(self):
        return [{"Alive": True, "Resources": {"CPU": 16.0, "GPU": self.gpus}},
                {"Alive": False, "Resources": {"CPU": 16.0, "GPU": 8.0}}]

    def remote(self, func):
        fake = self

        class Task:
            def options(self, **options):
                fake.options.append(options)
                return self

            def remote(self, *args):
                return lambda: func(*args)  # an object reference: hashable, fetched by get

        return Task()

    def wait(self, pending, num_returns, timeout, fetch_local):
        return pending, []

    def get(self, ref):
        return ref()

    def cancel(self, ref, force):
        raise AssertionError("nothing to cancel")


@dataclasses.dataclass
class StubWorker:
    device: str
    ranks: int = 1

    def run(self, config, sweep_id=None, device=None):
        return make_result(sweep_id=sweep_id, batch=config.batch).replace(config=config)


def _fake_executor(monkeypatch, gpus: float) -> tuple[RayExecutor, FakeRay, list]:
    fake, devices_run = FakeRay(gpus), []

    def shared_worker(device, ranks=1):
        devices_run.append(device if ranks == 1 else (device, ranks))
        return StubWorker(device, ranks)

    monkeypatch.setattr(worker, "shared_worker", shared_worker)
    executor = RayExecutor()
    executor._ray = fake
    return executor, fake, devices_run


@pytest.mark.parametrize("device, gpus", [("cpu", 0), ("mps", 0), ("cuda", 1), ("cuda:3", 1), ("auto", 1)])
def test_gpus_needed(device, gpus):
    assert gpus_needed(BenchConfig(device=device)) == gpus


def test_each_task_asks_for_the_gpus_its_run_needs_and_runs_on_the_gpu_ray_gave_it(monkeypatch):
    executor, fake, devices_run = _fake_executor(monkeypatch, gpus=2)
    configs = [BenchConfig(device="cuda:1", batch=1), BenchConfig(device="auto", batch=2),
               BenchConfig(device="cpu", batch=3)]
    results = run_sweep(configs, executor=executor)
    assert [o["num_gpus"] for o in fake.options] == [1, 1, 0]
    assert all(o["max_retries"] == 0 for o in fake.options)
    # In a task, Ray's GPU is the only one visible: every CUDA config runs on its cuda:0.
    assert devices_run == ["cuda:0", "cuda:0", "cpu"]
    assert sorted(r.config.batch for r in results) == [1, 2, 3] and all(r.ok for r in results)


def test_auto_runs_on_the_cpu_of_a_cluster_without_gpus(monkeypatch):
    executor, fake, devices_run = _fake_executor(monkeypatch, gpus=0)
    run_sweep([BenchConfig(device="auto")], executor=executor)
    assert fake.options[0]["num_gpus"] == 0 and devices_run == ["cpu"]


def test_a_task_ray_lost_is_an_error_result(monkeypatch):
    executor, fake, _ = _fake_executor(monkeypatch, gpus=0)

    def lost(ref):
        raise RuntimeError("The worker died unexpectedly while executing this task.")

    monkeypatch.setattr(fake, "get", lost)
    [result] = run_sweep([BenchConfig(device="cpu")], executor=executor)
    assert result.status == "error" and "the Ray task failed" in result.error and "worker died" in result.error
    assert_valid(result)


def test_a_gpu_config_on_a_cluster_without_gpus_fails_instead_of_waiting_forever(monkeypatch):
    executor, fake, _ = _fake_executor(monkeypatch, gpus=0)
    results = run_sweep([BenchConfig(device="cuda", batch=1), BenchConfig(device="cpu", batch=2)], executor=executor)
    by_batch = {r.config.batch: r for r in results}
    assert by_batch[2].ok and [o["num_gpus"] for o in fake.options] == [0]  # only the CPU config became a task
    assert by_batch[1].status == "error" and "largest node has 0" in by_batch[1].error
    assert by_batch[1].env.device_type == "cuda"


def test_a_new_gpu_assignment_is_probed_again(monkeypatch):
    from engine import devices

    cleared = []
    monkeypatch.setattr(devices.cuda_gpus, "cache_clear", lambda: cleared.append(True))
    monkeypatch.setattr(worker, "shared_worker", StubWorker)
    monkeypatch.setattr(ray_executor, "_task_visible", [None])
    config = BenchConfig(device="cuda").to_dict()
    for visible in ("0", "0", "1"):
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
        ray_executor._run_in_task(config, "sweep", 1)
    assert len(cleared) == 2  # for "0", then for "1"; not again for the same GPU


def test_a_data_parallel_task_gets_a_worker_for_every_gpu_ray_gave_it(monkeypatch):
    executor, fake, devices_run = _fake_executor(monkeypatch, gpus=2)
    placement = importlib.import_module("ray.util.placement_group")
    monkeypatch.setattr(placement, "placement_group", lambda bundles, strategy: "group")
    monkeypatch.setattr(placement, "remove_placement_group", lambda group: None)
    results = run_sweep([BenchConfig(device="cuda", nproc=2, parallel="ddp")], executor=executor)
    assert [o["num_gpus"] for o in fake.options] == [2]
    assert devices_run == [("cuda:0", 2)] and results[0].ok  # Ray's two GPUs are the task's cuda:0 and cuda:1


def test_a_run_of_several_gpus_reserves_them_on_one_node_and_gives_them_back(monkeypatch):
    placement = importlib.import_module("ray.util.placement_group")  # the module (ray.util's name is the function)
    executor, fake, _ = _fake_executor(monkeypatch, gpus=4)
    made, removed = [], []
    monkeypatch.setattr(placement, "placement_group", lambda bundles, strategy: made.append((bundles, strategy)) or
                        f"group-{len(made)}")
    monkeypatch.setattr(placement, "remove_placement_group", removed.append)
    needs = {1: 2, 2: 8, 3: 1}  # GPUs per run, by batch (several ranks: the nproc of a parallel run)
    monkeypatch.setattr(ray_executor, "gpus_needed", lambda config: needs[config.batch])
    results = run_sweep([BenchConfig(device="cuda", batch=b) for b in (1, 2, 3)], executor=executor)
    assert made == [([{"GPU": 2, "CPU": 1}], "STRICT_PACK")] and removed == ["group-1"]
    assert [o["num_gpus"] for o in fake.options] == [2, 1]
    assert fake.options[0]["scheduling_strategy"].placement_group == "group-1"
    assert "scheduling_strategy" not in fake.options[1]
    by_batch = {r.config.batch: r for r in results}
    assert by_batch[2].status == "error" and "needs 8 GPU(s) on one node" in by_batch[2].error
    assert by_batch[1].ok and by_batch[3].ok
