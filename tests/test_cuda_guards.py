"""CUDA and NVML paths, guarded on a machine without a GPU: fake events and streams, a mocked
``torch.cuda`` and a fake ``pynvml``. Each test fails if a defect of the CUDA review comes
back (events on another GPU's stream, host synchronisation inside a timed step, MIG peaks,
energy from a too-short window, NVML by index, the memory cap, two workers for one GPU...).
"""
from __future__ import annotations

import contextlib
import os
import sys
import threading
import types

import pytest
import torch

from engine import BenchConfig, counters, devices, nvml, worker
from engine.config import GIB
from engine.selfcheck import host_reads_raise
from engine.step import EventTimer, build_step, make_optimizer
from engine.timeline import allocated_over_time

TINY = {"n_layers": 2, "seq_len": 16, "d_model": 32, "n_heads": 2, "vocab": 64}


# ------------------------------------------------------------------------- fakes
class FakeStream:
    def __init__(self, device):
        self.device = torch.device(device)


class FakeEvent:
    """A CUDA event that remembers the stream it was recorded on and counts host waits."""

    synchronized = 0

    def __init__(self, enable_timing=False):
        assert enable_timing
        self.stream = None
        self.t = None

    def record(self, stream=None):
        assert stream is not None, "recorded without a stream: the current device's, maybe another GPU"
        self.stream = stream
        FakeEvent.clock += 1.0
        self.t = FakeEvent.clock

    def synchronize(self):
        FakeEvent.synchronized += 1

    def elapsed_time(self, end):
        return end.t - self.t


@pytest.fixture
def fake_cuda_events(monkeypatch):
    FakeEvent.synchronized, FakeEvent.clock = 0, 0.0
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: FakeStream(device))
    return FakeEvent


# ------------------------------------------------------------------------- timing
def test_events_are_recorded_on_the_target_devices_stream(fake_cuda_events):
    timer = EventTimer(torch.device("cuda:1"))
    for phase in ("start", "forward", "backward", "optimizer"):
        timer.mark(phase)
    streams = {event.stream.device for _, event in timer._marks}
    assert streams == {torch.device("cuda:1")}  # not the current device's (cuda:0) stream
    times = timer.collect()
    assert times == {"forward_ms": 1.0, "backward_ms": 1.0, "optimizer_ms": 1.0, "step_ms": 3.0}


@pytest.mark.parametrize("accum", [1, 3])
def test_exactly_one_host_synchronisation_per_step_and_events_are_reused(fake_cuda_events, accum):
    step = build_step(BenchConfig(model="gpt-tiny", overrides=TINY, batch=2, accum=accum, device="cpu"))
    timer = EventTimer(torch.device("cuda:0"))
    for n in range(1, 4):
        step.run(timer)
        timer.collect()
        assert fake_cuda_events.synchronized == n
    assert len(timer._pool) == 2 + 2 * accum  # start, forward/backward per micro-batch, optimizer


@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("ckpt", ["none", "full", "every-k", "selective"])
@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_no_host_synchronisation_inside_a_timed_step(precision, ckpt, optimizer):
    step = build_step(BenchConfig(model="gpt-tiny", overrides=TINY, batch=2, accum=2, precision=precision, ckpt=ckpt,
                                  optimizer=optimizer, device="cpu"))
    # The optimizer a CUDA run gets (fused, which also takes GradScaler's inf check on the
    # device); on the CPU, fused kernels exist too, so the CUDA code path runs here.
    step.optimizer = make_optimizer(step.model, optimizer, torch.device("cuda"))
    step.run()  # optimizer state and the scaler's first scale exist, as after warm-up
    with host_reads_raise():
        step.run()


def test_the_no_sync_guard_catches_a_synchronising_step():
    step = build_step(BenchConfig(model="gpt-tiny", overrides=TINY, batch=2, device="cpu"))
    step.run()  # foreach AdamW on the CPU reads its step counter on the host
    with pytest.raises(RuntimeError, match="host synchronisation"), host_reads_raise():
        step.run()


# ------------------------------------------------------------------------- NVML
class FakeProcess:
    def __init__(self, pid, used):
        self.pid, self.usedGpuMemory = pid, used


def fake_pynvml(handles: dict, energy=None, processes=None, used=10 * GIB):
    """A pynvml module knowing ``handles`` (UUID -> handle); energy: a list of readings (mJ)."""
    module = types.ModuleType("pynvml")
    readings = list(energy or [])

    class NVMLError(Exception):
        pass

    def by_uuid(uuid):
        if uuid not in handles:
            raise NVMLError("Not Found")
        return handles[uuid]

    def energy_mj(handle):
        if not readings:
            raise NVMLError("Not Supported")
        return readings.pop(0)

    module.NVMLError = NVMLError
    module.nvmlInit = lambda: None
    module.nvmlShutdown = lambda: None
    module.nvmlDeviceGetHandleByUUID = by_uuid
    module.nvmlDeviceGetMemoryInfo = lambda handle: types.SimpleNamespace(used=used, total=80 * GIB)
    module.nvmlDeviceGetComputeRunningProcesses = lambda handle: list(processes or [])
    module.nvmlDeviceGetTotalEnergyConsumption = energy_mj
    return module


@pytest.mark.parametrize("uuid", ["GPU-11111111-2222-3333-4444-555555555555", "MIG-aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee"])
def test_nvml_finds_the_device_by_uuid_including_mig_instances(monkeypatch, uuid):
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml({uuid: "handle"}, energy=[5000]))
    counters_ = nvml.GpuCounters(uuid)
    assert counters_.handle == "handle" and counters_.energy_mj() == 5000 and counters_.used_bytes() == 10 * GIB
    counters_.close()


def test_an_unknown_uuid_reads_nothing_rather_than_another_gpu(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml({"GPU-other": "wrong gpu"}, energy=[1]))
    counters_ = nvml.GpuCounters("GPU-mine")
    assert counters_.handle is None and counters_.energy_mj() is None and counters_.used_bytes() is None
    assert counters_.processes() is None


@pytest.mark.parametrize("raw, name, expected", [
    ("11111111-2222", "NVIDIA H100 80GB HBM3", "GPU-11111111-2222"),
    ("aaaaaaaa-bbbb", "NVIDIA H100 80GB HBM3 MIG 1g.10gb", "MIG-aaaaaaaa-bbbb"),
    ("GPU-11111111", "anything", "GPU-11111111"),
    (None, "NVIDIA H100", None),
])
def test_torch_uuids_are_written_as_nvml_and_cuda_visible_devices_write_them(raw, name, expected):
    assert devices.normalised_uuid(raw, name) == expected


# ------------------------------------------------------------------------- device counters
@pytest.fixture
def mocked_cuda(monkeypatch):
    """torch.cuda as DeviceCounters and the memory cap call it, recording the calls."""
    calls = []
    stats = {"allocated_bytes.all.peak": 3 * GIB, "reserved_bytes.all.peak": 4 * GIB, "num_alloc_retries": 0}
    fake = types.SimpleNamespace(
        synchronize=lambda device=None: calls.append("synchronize"),
        reset_peak_memory_stats=lambda device=None: calls.append("reset_peak_memory_stats"),
        memory_stats=lambda device=None: dict(stats),
        empty_cache=lambda: calls.append("empty_cache"),
        memory_reserved=lambda device=None: 0,
        mem_get_info=lambda device=None: (79 * GIB, 80 * GIB),
        get_device_properties=lambda device=None: types.SimpleNamespace(total_memory=80 * GIB),
        set_per_process_memory_fraction=lambda fraction, device=None: calls.append(("fraction", fraction)),
    )
    monkeypatch.setattr(counters.torch, "cuda", fake)
    monkeypatch.setattr(devices, "device_key", lambda device: "GPU-test")
    return types.SimpleNamespace(calls=calls, stats=stats)


@pytest.fixture
def fake_clock(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(counters.time, "perf_counter", lambda: now[0])
    return now


def _counters(monkeypatch, **nvml_kwargs):
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml({"GPU-test": "h"}, **nvml_kwargs))
    return counters.DeviceCounters(torch.device("cuda:0"))


def test_energy_window_is_extended_to_two_seconds_and_converted_from_mj(monkeypatch, mocked_cuda, fake_clock):
    # 10 timed steps take 0.3 s; untimed steps of 0.1 s each complete the 2 s window.
    c = _counters(monkeypatch, energy=[1_000_000, 1_600_000], processes=[FakeProcess(os.getpid(), 5 * GIB)])
    c.start()
    fake_clock[0] += 0.3
    c.stop()
    extra = []

    def run_step():
        extra.append(1)
        fake_clock[0] += 0.1

    c.measure_energy(run_step, samples_per_step=8, steps_done=10, deadline_s=fake_clock[0] + 60)
    c.close()
    assert len(extra) == 17  # 0.3 s + 17 × 0.1 s = 2.0 s
    assert c.energy_j_per_sample == pytest.approx(600.0 / (27 * 8))  # 600 000 mJ = 600 J over 27 steps
    assert any("whole GPU" in note for note in c.notes)


def test_energy_is_unknown_when_the_window_cannot_reach_two_seconds(monkeypatch, mocked_cuda, fake_clock):
    c = _counters(monkeypatch, energy=[1_000, 2_000])
    c.start()
    fake_clock[0] += 0.3
    c.stop()
    c.measure_energy(lambda: None, 8, 10, deadline_s=fake_clock[0])  # no time left for extra steps
    assert c.energy_j_per_sample is None and any("shorter than the 2 s" in note for note in c.notes)


def test_energy_is_unknown_without_a_counter_or_when_it_does_not_advance(monkeypatch, mocked_cuda, fake_clock):
    c = _counters(monkeypatch, energy=[])
    c.start()
    c.stop()
    c.measure_energy(lambda: None, 8, 10, deadline_s=fake_clock[0] + 60)
    assert c.energy_j_per_sample is None and any("no total-energy counter" in note for note in c.notes)
    c = _counters(monkeypatch, energy=[5_000, 5_000])
    c.start()
    fake_clock[0] += 3.0
    c.stop()
    c.measure_energy(lambda: None, 8, 10, deadline_s=fake_clock[0] + 60)
    assert c.energy_j_per_sample is None and any("did not advance" in note for note in c.notes)


def test_this_process_memory_and_other_compute_processes(monkeypatch, mocked_cuda, fake_clock):
    mine = os.getpid()
    c = _counters(monkeypatch, processes=[FakeProcess(mine, 5 * GIB), FakeProcess(424242, 2 * GIB)])
    c.start()
    c.stop()
    assert c.nvml_used_bytes == 5 * GIB and c.nvml_device_used_bytes == 10 * GIB
    assert c.peak_allocated_bytes == 3 * GIB and c.peak_reserved_bytes == 4 * GIB
    assert c.other_processes == [424242] and any("timings are disturbed" in note for note in c.notes)
    alone = _counters(monkeypatch, processes=[FakeProcess(mine, 5 * GIB)])
    alone.start()
    alone.stop()
    assert alone.other_processes == [] and alone.notes == []


def test_in_a_container_nvml_pids_are_foreign_and_the_figure_is_unknown(monkeypatch, mocked_cuda, fake_clock):
    c = _counters(monkeypatch, processes=[FakeProcess(1, 5 * GIB), FakeProcess(2, 1 * GIB)])
    c.start()
    c.stop()
    assert c.nvml_used_bytes is None and c.other_processes == [1, 2]
    assert any("pid namespace" in note for note in c.notes)


def test_peaks_are_reset_before_timing_and_read_after_a_synchronisation(monkeypatch, mocked_cuda, fake_clock):
    c = _counters(monkeypatch)
    c.start()
    assert mocked_cuda.calls == ["synchronize", "reset_peak_memory_stats"]
    c.stop()
    assert mocked_cuda.calls[-1] == "synchronize"


# ------------------------------------------------------------------------- memory cap
def test_the_cap_leaves_room_for_the_cuda_context_and_is_restored(monkeypatch, mocked_cuda):
    # 1 GiB in use on the device outside the allocator: a 24 GiB cap gives the allocator 23 GiB.
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml({}))  # no per-process figure: device figure
    notes = []
    with counters.memory_cap(torch.device("cuda:0"), 24.0, notes):
        assert mocked_cuda.calls == ["empty_cache", ("fraction", 23 / 80)]
    assert mocked_cuda.calls[-2:] == [("fraction", 1.0), "empty_cache"]
    assert "23.00 GiB for the caching allocator + 1.00 GiB CUDA context" in notes[0]


def test_the_cap_is_restored_when_the_run_fails(monkeypatch, mocked_cuda):
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml({"GPU-test": "h"}, processes=[FakeProcess(os.getpid(), GIB // 2)]))
    with pytest.raises(RuntimeError, match="boom"), counters.memory_cap(torch.device("cuda:0"), 8.0, []):
        raise RuntimeError("boom")
    fractions = [call[1] for call in mocked_cuda.calls if isinstance(call, tuple)]
    assert fractions == [pytest.approx(7.5 / 80), 1.0]  # NVML's own figure for this process: 0.5 GiB
    assert mocked_cuda.calls[-1] == "empty_cache"


def test_a_cap_below_the_context_is_out_of_memory(monkeypatch, mocked_cuda):
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml({}))
    with pytest.raises(RuntimeError, match="out of memory: the memory cap of 0.5 GiB is below"):
        with counters.memory_cap(torch.device("cuda:0"), 0.5, []):
            pass


def test_no_cap_and_cpu_runs_touch_nothing(mocked_cuda):
    with counters.memory_cap(torch.device("cuda:0"), None, []), counters.memory_cap(torch.device("cpu"), 4.0, []):
        pass
    assert mocked_cuda.calls == []


# ------------------------------------------------------------------------- allocator trace
def test_the_timeline_parser_follows_allocations_and_completed_frees():
    trace = [
        {"action": "segment_alloc", "size": 2 * GIB, "time_us": 1_000_000},
        {"action": "alloc", "size": 100, "time_us": 1_000_500},
        {"action": "alloc", "size": 50, "time_us": 1_001_000},
        {"action": "free_requested", "size": 100, "time_us": 1_001_500},  # the stream still uses it
        {"action": "free_completed", "size": 100, "time_us": 1_002_000},
    ]
    times, values = allocated_over_time(trace, start_bytes=1000, t0_ms=1_000.0)
    assert times == [0.0, 0.5, 1.0, 2.0]
    assert values == [1000, 1100, 1150, 1050]
    with pytest.raises(RuntimeError, match="time_us"):
        allocated_over_time([{"action": "alloc", "size": 1}], 0, 0.0)


# ------------------------------------------------------------------------- one GPU, one worker
@pytest.fixture
def two_gpus(monkeypatch):
    gpus = (devices.CudaGpu(0, "GPU-aaaa", "NVIDIA H100 80GB HBM3", 80 * GIB),
            devices.CudaGpu(1, "GPU-bbbb", "NVIDIA H100 80GB HBM3", 80 * GIB))
    monkeypatch.setattr(devices, "cuda_gpus", lambda: gpus)
    monkeypatch.delenv(devices.PINNED_ENV, raising=False)
    return gpus


def test_auto_cuda_and_cuda0_are_one_gpu_one_worker_and_one_queue(two_gpus, monkeypatch):
    assert devices.resolve_device("auto") == "cuda"
    assert devices.device_key("auto") == devices.device_key("cuda") == devices.device_key("cuda:0") == "GPU-aaaa"
    assert devices.device_key("cuda:1") == "GPU-bbbb"
    assert devices.visible_devices_for("auto") == "GPU-aaaa" and devices.visible_devices_for("cpu") is None
    monkeypatch.setattr(worker, "_shared", {})
    assert worker.shared_worker("auto") is worker.shared_worker("cuda:0") is worker.shared_worker("cuda")
    assert worker.shared_worker("cuda:1") is not worker.shared_worker("cuda:0")
    assert devices.device_capacity_bytes("cuda:1") == 80 * GIB

    keys = []

    @contextlib.contextmanager
    def recording_queue(key, on_wait=None):
        keys.append(key)
        yield

    monkeypatch.setattr(worker, "device_queue", recording_queue)
    cancel = threading.Event()
    cancel.set()  # stops each call right after it has its place in the queue: nothing starts
    for device in ("auto", "cuda:0"):
        worker.Worker().call(print, device=device, timeout_s=1, cancel=cancel)
    assert keys == []  # a call cancelled before it starts never queues
    cancel.clear()
    monkeypatch.setattr(worker.Worker, "_call_here", lambda self, *args: worker.Outcome("ok"))
    for device in ("auto", "cuda", "cuda:0"):
        worker.Worker().call(print, device=device, timeout_s=1)
    assert keys == ["GPU-aaaa"] * 3


def _report_pinning(channel):
    return os.environ.get("CUDA_VISIBLE_DEVICES"), devices.resolve_device("cuda:1"), devices.resolve_device("auto")


def test_a_worker_for_one_gpu_sees_only_that_gpu_as_cuda0():
    pinned = worker.Worker("GPU-bbbb")
    try:
        outcome = pinned.call(_report_pinning, device="cpu", timeout_s=60)
    finally:
        pinned.close()
    assert outcome.ok, outcome.error
    assert outcome.value == ("GPU-bbbb", "cuda:0", "cuda:0")


def test_nvml_and_cuda_indices_are_matched_by_uuid(two_gpus, monkeypatch):
    # NVML numbers GPUs by PCI bus; CUDA may not (CUDA_DEVICE_ORDER, CUDA_VISIBLE_DEVICES).
    listed = [{"index": 0, "name": "NVIDIA H100 80GB HBM3", "uuid": "GPU-bbbb"},
              {"index": 1, "name": "NVIDIA H100 80GB HBM3", "uuid": "GPU-aaaa"},
              {"index": 2, "name": "NVIDIA H100 80GB HBM3", "uuid": "GPU-cccc"}]
    monkeypatch.setattr(nvml, "list_gpus", lambda: listed)
    assert [(g["index"], g["cuda_index"]) for g in devices.gpus()] == [(0, 1), (1, 0), (2, None)]


def test_a_cpu_only_torch_build_needs_no_probe(monkeypatch):
    devices.cuda_gpus.cache_clear()
    monkeypatch.setattr(devices, "_cuda_wheel_expected", lambda: False)
    monkeypatch.setattr(devices.subprocess, "run", lambda *a, **k: pytest.fail("probed a CPU-only build"))
    try:
        assert devices.cuda_gpus() == () and devices.resolve_device("auto") in ("cpu", "mps")
    finally:
        devices.cuda_gpus.cache_clear()


def test_the_probe_reads_torchs_devices_in_a_subprocess(monkeypatch):
    devices.cuda_gpus.cache_clear()
    monkeypatch.setattr(devices, "_cuda_wheel_expected", lambda: True)
    out = '[{"index": 0, "uuid": "1234-abcd", "name": "NVIDIA A100-SXM4-80GB MIG 3g.40gb", "total_memory": 42949672960}]'
    monkeypatch.setattr(devices.subprocess, "run", lambda *a, **k: types.SimpleNamespace(stdout=out + "\n"))
    try:
        assert devices.cuda_gpus() == (devices.CudaGpu(0, "MIG-1234-abcd", "NVIDIA A100-SXM4-80GB MIG 3g.40gb", 40 * GIB),)
    finally:
        devices.cuda_gpus.cache_clear()


# ------------------------------------------------------------------------- warm-up and the baseline
@pytest.mark.parametrize("device, precision, minimum", [("cuda", "fp32", 1), ("cuda:1", "bf16", 1), ("cuda", "fp16", 2)])
def test_cuda_needs_warm_up_steps(device, precision, minimum):
    from engine import ConfigError

    with pytest.raises(ConfigError) as info:
        BenchConfig(device=device, precision=precision, warmup=minimum - 1)
    assert info.value.field == "warmup" and f">= {minimum} on CUDA" in info.value.allowed
    BenchConfig(device=device, precision=precision, warmup=minimum)
    BenchConfig(device="cpu", precision=precision, warmup=0)


def test_auto_on_a_gpu_machine_needs_the_warm_up_too(two_gpus):
    from engine import ConfigError, check_runnable

    with pytest.raises(ConfigError) as info:
        check_runnable(BenchConfig(device="auto", warmup=0))
    assert info.value.field == "warmup"


def test_the_baseline_is_its_own_reference_without_running(monkeypatch):
    from engine import numerics

    monkeypatch.setattr(numerics, "first_step_grads", lambda config: pytest.fail("ran a step for the baseline"))
    assert numerics.grad_rel_diff(BenchConfig(device="cuda", warmup=1)) == (0.0, None)


def test_the_allocator_settings_are_part_of_the_environment(monkeypatch):
    from engine.devices import allocator_settings

    monkeypatch.delenv("PYTORCH_ALLOC_CONF", raising=False)
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    assert allocator_settings() is None
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    assert allocator_settings() == "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True"
