"""Device page: a plain notice and the CPU without a GPU; live GPU numbers when NVML has some."""
from engine import devices, nvml
from engine.config import GIB
from tests.app_fixtures import app_db, open_app, shown  # noqa: F401 - app_db is a fixture


def test_without_a_gpu_the_page_says_so_and_names_the_cpu(app_db, monkeypatch):
    monkeypatch.setattr(nvml, "list_gpus", lambda: [])
    monkeypatch.setattr(nvml, "unavailable_reason", lambda: "No NVIDIA driver found (NVML: Driver Not Loaded)")
    monkeypatch.setattr(devices, "cpu_model_name", lambda: "Test CPU 9000")
    monkeypatch.setattr(devices, "cpu_facts", lambda: {
        "cpu": "Test CPU 9000", "logical_cores": 4, "usable_cores": 2, "torch_threads": 2, "ram_bytes": 24 * GIB,
        "available_bytes": 20 * GIB, "load_avg": 1.73})
    at = open_app("views/device.py")
    [notice] = at.info
    assert "No NVIDIA driver found" in notice.value and "Test CPU 9000" in notice.value
    # What decides whether CPU timings mean anything: cores, threads, RAM, load (busy: warned).
    assert [(m.label, m.value) for m in at.metric] == [
        ("Cores (usable / logical)", "2 / 4"), ("Torch threads", "2"), ("RAM available / total", "20 / 24 GiB"),
        ("Load (1 min)", "1.73")]
    assert "This CPU is busy (load 1.73 on 2 usable cores)" in at.warning[0].value


def test_cpu_facts_are_read_from_this_machine():
    facts = devices.cpu_facts()
    assert facts["usable_cores"] >= 1 and facts["torch_threads"] >= 1 and facts["ram_bytes"] > GIB
    assert 0 < facts["available_bytes"] <= facts["ram_bytes"]


def test_gpus_are_listed_with_memory_utilisation_temperature_and_power(app_db, monkeypatch):
    gpu = {"index": 0, "name": "NVIDIA H100 80GB HBM3", "uuid": "GPU-0000", "memory_used_bytes": 20 * GIB,
           "memory_total_bytes": 80 * GIB, "utilization_pct": 97, "temperature_c": 61, "power_w": 612.4,
           "driver": "570.86", "cuda": "12.8"}
    hidden = gpu | {"index": 1, "uuid": "GPU-1111"}
    monkeypatch.setattr(nvml, "list_gpus", lambda: [gpu, hidden])
    # CUDA numbers this GPU cuda:3 (CUDA_VISIBLE_DEVICES reorders): matched by its UUID.
    monkeypatch.setattr(devices, "cuda_gpus", lambda: (devices.CudaGpu(3, "GPU-0000", gpu["name"], 80 * GIB),))
    monkeypatch.setattr(devices, "resolve_device", lambda device: "cuda")
    at = open_app("views/device.py")
    assert at.subheader[0].value == "GPU NVML 0 = cuda:3: NVIDIA H100 80GB HBM3"
    assert at.subheader[1].value == "GPU NVML 1 = not visible to CUDA here: NVIDIA H100 80GB HBM3"
    assert [m.value for m in at.metric][:4] == ["20.0 / 80.0 GiB", "97 %", "61 °C", "612 W"]
    assert at.get("progress")[0].value == 25
    assert "Driver 570.86 · CUDA 12.8" in [shown(c.value) for c in at.caption]
    assert any("Runs with device auto use cuda." in shown(caption.value) for caption in at.caption)


def test_the_self_check_runs_from_the_page_and_shows_every_check(app_db, monkeypatch):
    from engine import selfcheck
    from tests.app_fixtures import click, finished, wait_until

    checks = [selfcheck.Check("timing attribution", "pass", "backward 45-80 ms", "backward 50.2 ms"),
              selfcheck.Check("timing illusion", "skip", "naive forward < 15 ms", "-", "needs a GPU")]
    monkeypatch.setattr(nvml, "list_gpus", lambda: [])
    monkeypatch.setattr(selfcheck, "run_selfcheck", lambda device, progress=None, cancel=None: checks)
    at = click(open_app("views/device.py"), "Run self-check")
    at = wait_until(at, finished("device.selfcheck"))
    [table] = at.dataframe
    assert list(table.value["result"]) == ["pass", "skip"] and "needs a GPU" in list(table.value["why"])
    assert at.success[0].value == "No check failed."
