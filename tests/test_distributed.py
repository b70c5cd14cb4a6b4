"""Data parallel (DDP, FSDP) on CPU with two gloo ranks: the same gradients as one process,
FSDP's sharded state, one result from every rank, and failures that leave no rank behind.

CUDA's side (one GPU per rank, every GPU in the device queue) is checked with the fake
probe of tests/test_cuda_guards.py: there is no GPU here.
"""
import contextlib
import os
import time
import uuid

import pytest
import torch

from engine import devices, distributed, worker
from engine.config import BenchConfig, ConfigError, check_runnable, gpus_needed
from engine.results import Result, parse_results
from engine.step import PhaseTimer, TrainingStep
from tests.factories import assert_valid
from tests.helper_models import rank_pid_dir

GIB = 1024**3
TINY_DIMS = {"n_layers": 2, "seq_len": 16, "d_model": 64, "n_heads": 2, "vocab": 256}


def ddp(**fields) -> BenchConfig:
    return BenchConfig(**{"model": "gpt-tiny", "overrides": TINY_DIMS, "batch": 2, "warmup": 1, "steps": 2,
                          "device": "cpu", "nproc": 2, "parallel": "ddp", **fields})


# ------------------------------------------------------------------ gradients and sharding
class _GradsAfterBackward(PhaseTimer):
    """Keeps the gradients as the last micro-batch's backward leaves them (reduced across
    ranks), before the optimizer step clears them."""

    def __init__(self, model):
        self.model = model
        self.grads = None

    def mark(self, phase):
        if phase == "backward":
            self.grads = {name: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).detach().clone()
                          for name, p in self.model.named_parameters()}


def _rank_grads_and_state(config_dict):
    """In each rank: DDP's and FSDP's gradients of one step, the batches, and what each keeps."""
    import torch.distributed as dist

    dist.init_process_group("gloo")
    try:
        rank, world = dist.get_rank(), dist.get_world_size()
        out = {}
        for parallel in ("ddp", "fsdp"):
            config = BenchConfig.from_dict(config_dict | {"parallel": parallel})
            step = distributed.build_rank_step(config, rank, world, torch.device("cpu"))
            timer = _GradsAfterBackward(step.model)
            step.run(timer)
            # DDP names parameters "module.<name>"; FSDP keeps the model's own names.
            grads = {name.removeprefix("module."): g.numpy() for name, g in timer.grads.items()}
            out[parallel] = {"grads": grads, "resident": distributed.resident_bytes(step),
                             "buckets": distributed.ddp_bucket_bytes(step.model),
                             "batches": [tuple(t.numpy() for t in batch) for batch in step.batches]}
        return out
    finally:
        dist.destroy_process_group()


def test_ddp_and_fsdp_gradients_equal_one_process_with_accumulation_2_and_fsdp_shards_the_state():
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = ddp(optimizer="adamw")
    launch = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=2, run_id=uuid.uuid4().hex,
                          rdzv_backend="c10d", rdzv_endpoint="127.0.0.1:0", max_restarts=0, monitor_interval=0.1)
    ranks = elastic_launch(launch, _rank_grads_and_state)(config.to_dict())

    # One process, accumulation 2, whose two micro-batches are the two ranks' batches.
    single = config.replace(nproc=1, parallel="none", accum=2)
    torch.manual_seed(single.seed)
    from engine import models

    model, make_batch = models.build(single.model, single.overrides)
    step = TrainingStep(model, make_batch, single, "cpu")
    step.batches = [tuple(torch.from_numpy(t) for t in ranks[r]["ddp"]["batches"][0]) for r in (0, 1)]
    assert not torch.equal(step.batches[0][0], step.batches[1][0])  # each rank has its own data
    reference = _GradsAfterBackward(step.model)
    step.run(reference)

    for parallel in ("ddp", "fsdp"):
        for rank in (0, 1):
            grads = ranks[rank][parallel]["grads"]
            assert grads.keys() == reference.grads.keys()
            for name, expected in reference.grads.items():
                torch.testing.assert_close(torch.from_numpy(grads[name]), expected, rtol=1e-4, atol=1e-6,
                                           msg=f"{parallel} rank {rank}: {name}")

    # DDP's buckets hold one more copy of the gradients; FSDP has none.
    assert ranks[0]["ddp"]["buckets"] == 4 * sum(p.numel() for p in model.parameters())
    assert ranks[0]["fsdp"]["buckets"] == 0
    ddp_state = ranks[0]["ddp"]["resident"]
    for rank in (0, 1):
        fsdp_state = ranks[rank]["fsdp"]["resident"]
        ratio = (fsdp_state["params"] + fsdp_state["optimizer"]) / (ddp_state["params"] + ddp_state["optimizer"])
        assert 0.45 < ratio < 0.55, (rank, fsdp_state, ddp_state)  # 1/2, up to the padding of odd shards


# ------------------------------------------------------------------ combining the ranks
def _report(rank, steps, peak, **extra):
    breakdown = {"params": peak // 4, "grads": peak // 4, "optimizer": peak // 4, "activations": peak // 8,
                 "other": peak - 7 * (peak // 8)}
    return {"rank": rank, "env": {"device_type": "cpu", "device_name": "Test CPU", "gpu_uuid": None},
            "samples": {key: list(steps) for key in ("step_ms", "forward_ms", "backward_ms", "optimizer_ms")},
            "peak_allocated_bytes": peak, "peak_reserved_bytes": None, "nvml_used_bytes": None,
            "nvml_device_used_bytes": None, "allocator_retries": None, "breakdown": breakdown,
            "resident": {"params": 100, "optimizer": 200}, "tokens_per_sample": 16, "loss_scale": None,
            "skipped_steps": None, "checkpointed": None, "notes": [], **extra}


def test_the_result_is_the_slowest_rank_per_step_the_largest_peak_and_every_ranks_peak():
    config = ddp(batch=4, accum=3, steps=3)
    reports = [_report(0, [10.0, 30.0, 10.0], 1000), _report(1, [20.0, 10.0, 20.0], 3000)]
    result = distributed.combine(config, reports)
    assert result.samples["step_ms"] == [20.0, 30.0, 20.0]  # each step's slowest rank
    assert result.metrics.step_ms.median == 20.0
    assert result.metrics.effective_batch == 4 * 3 * 2 == config.effective_batch
    assert result.metrics.samples_per_s == pytest.approx(24 / 0.020)
    assert result.metrics.tokens_per_s == pytest.approx(24 / 0.020 * 16)
    assert result.metrics.rank_peak_bytes == [1000, 3000]
    assert result.metrics.peak_allocated_bytes == 3000 == result.metrics.memory_breakdown_bytes.total
    assert any("rank 1's (the largest peak)" in w for w in result.warnings)
    assert_valid(result)
    again = parse_results(result.to_json(), "test")[0]
    assert again.metrics.rank_peak_bytes == [1000, 3000]


def test_a_compiled_run_reports_the_slowest_ranks_compile_time_and_a_rank_that_compiled_nothing():
    config = ddp(batch=4, steps=3, warmup=2, compile="default")
    reports = [_report(0, [10.0, 10.0, 10.0], 1000, compiling_steps_s=[5.01, 1.01]),
               _report(1, [10.0, 10.0, 10.0], 1000, compiling_steps_s=[7.01])]
    result = distributed.combine(config, reports)
    assert result.metrics.compile_s == pytest.approx(7.0)  # rank 1's: the run waited for it
    assert not any("compiled no graph" in w for w in result.warnings)
    reports[1]["compiling_steps_s"] = []
    result = distributed.combine(config, reports)
    assert result.metrics.compile_s == pytest.approx(6.0)
    assert any("rank 1's warm-up: its steps ran eager" in w for w in result.warnings)
    assert distributed.combine(config.replace(compile="none"), reports).metrics.compile_s is None


def test_a_file_without_rank_peaks_reads_them_as_none_and_a_bad_list_is_refused():
    from tests.factories import make_result

    data = make_result().to_dict()
    del data["metrics"]["rank_peak_bytes"]
    assert Result.from_dict(data).metrics.rank_peak_bytes is None
    data["metrics"]["rank_peak_bytes"] = [1, "2"]
    with pytest.raises(ValueError, match=r"rank_peak_bytes\[1\]"):
        Result.from_dict(data)


# ------------------------------------------------------------------ real runs in the worker
def _children(pid: int) -> list[int]:
    """Processes whose parent is ``pid`` (Linux /proc)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid and fields[0] != "Z":
                found.append(int(entry))
    return found


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _rank_pids(worker_pid: int) -> list[int]:
    directory = rank_pid_dir(worker_pid)
    return [int(name) for name in os.listdir(directory)] if os.path.isdir(directory) else []


def _gone(pids, within_s=10.0) -> bool:
    deadline = time.monotonic() + within_s
    while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    return not any(_alive(pid) for pid in pids)


@pytest.fixture(scope="module")
def warm():
    w = worker.Worker()
    yield w
    w.close()


def test_a_ddp_run_in_the_worker_gives_one_result_and_leaves_no_child_process(warm):
    config = ddp(accum=2)
    events = []
    result = warm.run(config, events.append)
    assert result.status == "ok", result.error
    assert_valid(result)
    assert result.metrics.effective_batch == 2 * 2 * 2
    assert len(result.metrics.rank_peak_bytes) == 2 and result.metrics.peak_allocated_bytes == max(result.metrics.rank_peak_bytes)
    assert len(result.samples["step_ms"]) == config.steps
    assert [e.total for e in events if e.phase == "measure"][-1] == config.steps  # rank 0's progress arrives
    assert result.config.parallel == "ddp" and result.config.nproc == 2
    assert warm.pid is not None and _children(warm.pid) == []


def test_a_rank_out_of_memory_makes_the_run_oom_and_leaves_no_rank_behind(warm):
    warm.start()
    pid = warm.pid
    result = warm.run(ddp(model="tests.helper_models:oom_on_rank_1", overrides={}))
    assert result.status == "oom", result.error
    assert result.error.startswith("rank 1: OutOfMemoryError")
    assert result.metrics.rank_peak_bytes is None and result.metrics.step_ms is None
    ranks = _rank_pids(pid)
    assert len(ranks) == 2 and _gone(ranks)


def test_a_hanging_rank_times_out_and_every_rank_is_killed(warm):
    warm.start()
    pid = warm.pid
    result = warm.run(ddp(model="tests.helper_models:hangs_on_rank_1", overrides={}, timeout_s=20.0))
    assert result.status == "timeout"
    ranks = _rank_pids(pid)
    assert len(ranks) == 2 and _gone(ranks)  # the worker was killed, and its ranks with it


# ------------------------------------------------------------------ configuration
def test_several_ranks_need_a_wrapper_and_one_rank_may_have_one():
    with pytest.raises(ConfigError, match=r"^parallel: invalid value 'none'; allowed: ddp or fsdp with nproc 2"):
        BenchConfig(nproc=2)
    assert BenchConfig(nproc=1, parallel="ddp").distributed
    with pytest.raises(ConfigError, match="^nproc"):
        BenchConfig(nproc=0, parallel="ddp")
    with pytest.raises(ConfigError, match="^precision"):
        BenchConfig(nproc=2, parallel="fsdp", precision="fp16")
    assert BenchConfig(nproc=4, parallel="fsdp", batch=8, accum=2).effective_batch == 64
    assert "FSDP × 4 ranks, no reshard" in BenchConfig(nproc=4, parallel="fsdp", reshard=False).describe()


def test_ranks_are_limited_by_the_server_setting(monkeypatch):
    monkeypatch.setenv("TRADEOFF_LAB_MAX_NPROC", "2")
    with pytest.raises(ConfigError, match=r"^nproc: invalid value 3; allowed: at most 2 on this server \(TRADEOFF_LAB_MAX_NPROC"):
        check_runnable(BenchConfig(nproc=3, parallel="ddp", device="cpu"), check_memory=False)


def test_cli_flags_for_ranks(capsys):
    from engine.cli import main

    assert main(["run", "--nproc", "2", "--parallel", "fsdp", "--reshard", "maybe", "--device", "cpu"]) == 2
    assert "reshard: invalid value 'maybe'; allowed: true or false" in capsys.readouterr().err


# ------------------------------------------------------------------ CUDA, with a fake probe
@pytest.fixture
def three_gpus(monkeypatch):
    gpus = tuple(devices.CudaGpu(i, f"GPU-{c * 4}", "NVIDIA H100 80GB HBM3", 80 * GIB) for i, c in enumerate("abc"))
    monkeypatch.setattr(devices, "cuda_gpus", lambda: gpus)
    monkeypatch.delenv(devices.PINNED_ENV, raising=False)
    return gpus


def test_on_cuda_each_rank_has_a_gpu_the_worker_sees_them_all_and_the_queue_holds_them_all(three_gpus, monkeypatch):
    config = BenchConfig(device="cuda:1", nproc=2, parallel="ddp")
    assert gpus_needed(config) == 2 and gpus_needed(config.replace(device="cpu")) == 0
    assert gpus_needed(config.replace(device="auto")) == 2
    assert devices.visible_devices_for("cuda:1", 2) == "GPU-bbbb,GPU-cccc"
    assert devices.device_keys("auto", 2) == ("GPU-aaaa", "GPU-bbbb")
    assert devices.device_keys("cpu", 4) == ("cpu",)
    check_runnable(config, check_memory=False)
    with pytest.raises(ConfigError, match=r"^nproc: invalid value 3; allowed: at most 2 \(one GPU per rank"):
        check_runnable(config.replace(nproc=3), check_memory=False)

    monkeypatch.setattr(worker, "_shared", {})
    assert worker.shared_worker("cuda:1", 2) is not worker.shared_worker("cuda:1")
    assert worker.shared_worker("cuda:1", 2)._visible_devices == "GPU-bbbb,GPU-cccc"

    keys, tickets = [], []

    @contextlib.contextmanager
    def recording_queue(key, on_wait=None):
        keys.append(key)
        yield len(keys)

    monkeypatch.setattr(worker, "device_queue", recording_queue)
    # _call_here(func, args, device, timeout_s, progress, cancel, fresh, tickets, alloc_conf)
    monkeypatch.setattr(worker.Worker, "_call_here", lambda self, *args: tickets.append(args[7]) or worker.Outcome("ok"))
    worker.Worker().call(print, device="cuda:1", timeout_s=1, ranks=2)
    assert keys == ["GPU-bbbb", "GPU-cccc"] and tickets == [[1, 2]]


def test_every_caller_takes_gpu_queues_in_one_order(three_gpus, monkeypatch):
    # Two runs over GPUs {b, c} that asked from different ends still queue b before c, so
    # neither can hold one the other waits for.
    keys = []

    @contextlib.contextmanager
    def recording_queue(key, on_wait=None):
        keys.append(key)
        yield 0

    monkeypatch.setattr(devices, "device_keys", lambda device, count=1: ("GPU-cccc", "GPU-bbbb"))
    monkeypatch.setattr(worker, "device_queue", recording_queue)
    monkeypatch.setattr(worker.Worker, "_call_here", lambda self, *args: worker.Outcome("ok"))
    worker.Worker().call(print, device="cuda", timeout_s=1, ranks=2)
    assert keys == ["GPU-bbbb", "GPU-cccc"]


def test_a_worker_receives_every_ticket_of_its_gpus():
    # The real queue and the real protocol: a call holding two devices passes two tickets.
    w = worker.Worker()
    try:
        with contextlib.ExitStack() as held:
            tickets = [held.enter_context(worker.device_queue(key)) for key in ("dev-a", "dev-b")]
            with w._lock:
                outcome = w._call_here(_open_fds, (), "cpu", 60, None, None, False, tickets)
    finally:
        w.close()
    assert outcome.ok, outcome.error
    assert sorted(outcome.value) == ["dev-a", "dev-b"]


def _open_fds(channel):
    """The devices whose queue tickets this process holds open."""
    paths = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            paths.append(os.readlink(f"/proc/self/fd/{fd}"))
    return [os.path.basename(p).split(".")[0] for p in paths if p.endswith(".ticket")]


# ------------------------------------------------------------------ the analytic estimate
def test_the_estimate_knows_ddp_replicas_with_buckets_and_fsdp_shards_with_one_gathered_unit():
    from engine import models
    from engine.predict import analytic_estimate

    base = BenchConfig(model="gpt-small", batch=4, device="cpu")
    one = analytic_estimate(base)
    replicated = analytic_estimate(base.replace(nproc=4, parallel="ddp"))
    assert (replicated.params, replicated.grads, replicated.optimizer) == (one.params, one.grads, one.optimizer)
    assert replicated.data_parallel == one.grads  # the buckets: one more copy of the gradients
    assert replicated.peak == one.peak + one.grads

    sharded = analytic_estimate(base.replace(nproc=4, parallel="fsdp"))
    assert sharded.params * 4 == pytest.approx(one.params, abs=4) and sharded.optimizer * 4 == pytest.approx(one.optimizer, abs=4)
    with torch.device("meta"):
        model, _ = models.build("gpt-small", {})
    blocks = models.find_blocks(model).modules
    block = sum(p.numel() for p in blocks[0].parameters())
    root = sum(p.numel() for p in model.parameters()) - len(blocks) * block
    assert sharded.data_parallel == 4 * max(block, root)  # fp32, the largest unit gathered whole
    assert sharded.peak < one.peak < replicated.peak
    kept = analytic_estimate(base.replace(nproc=4, parallel="fsdp", reshard=False))
    assert kept.data_parallel == one.params and kept.peak > sharded.peak
    assert any(note.startswith("FSDP: ") for note in sharded.notes)


def test_a_cuda_rank_uses_its_own_gpu_of_the_workers_and_names_it(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-aaaa,GPU-bbbb")
    monkeypatch.setenv(devices.PINNED_ENV, "GPU-aaaa,GPU-bbbb")  # as the worker was pinned
    current = []
    monkeypatch.setattr(torch.cuda, "set_device", current.append)
    device = distributed.rank_device(BenchConfig(device="cuda", nproc=2, parallel="ddp"), 1, 2)
    assert device == torch.device("cuda", 1) and current == [device]
    assert devices.device_key(str(device)) == "GPU-bbbb"  # its NVML counters and env name its GPU


def test_a_sweep_at_an_effective_batch_counts_every_rank():
    from engine.sweep import expand

    configs, notes = expand({"model": "gpt-tiny", "device": "cpu", "nproc": 2, "parallel": "ddp"},
                            {"batch": [1, 2, 4, 8]}, effective_batch=8)
    assert [(c.batch, c.accum) for c in configs] == [(1, 4), (2, 2), (4, 1)]
    assert all(c.effective_batch == 8 for c in configs)
    assert notes == ["batch 8 × 2 ranks skipped: does not divide effective batch 8"]


def test_a_rank_that_dies_without_a_word_is_named_with_how_it_died():
    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

    failures = {1: ProcessFailure(1, 101, 3, ""), 0: ProcessFailure(0, 100, -9, "")}
    assert distributed.death_words(failures) == (
        "rank 0 died: killed by signal SIGKILL (on Linux often the kernel's out-of-memory killer); "
        "rank 1 died: exit code 3")


def test_run_directories_of_workers_that_are_gone_are_removed(tmp_path, monkeypatch):
    import subprocess
    import sys
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f"tradeoff-lab-ranks-{int(gone.stdout)}-abc"  # a worker killed for a timeout
    live = tmp_path / f"tradeoff-lab-ranks-{os.getpid()}-def"
    other = tmp_path / "something-else"
    for directory in (stale, live, other):
        (directory / "logs").mkdir(parents=True)
    distributed._remove_stale_run_dirs()
    assert not stale.exists() and live.exists() and other.exists()


def test_a_single_process_tool_refuses_a_data_parallel_config():
    from engine.step import build_step

    with pytest.raises(ConfigError, match=r"^parallel: invalid value 'ddp'; allowed: none here: this measures one process"):
        build_step(ddp())
