"""Optimizers and their implementation, the attention backend and the CUDA allocator settings:
value checks, the machine's checks (with a faked CUDA probe), what the step really runs, the
optimizer state measured against the analytic estimate, and the worker's allocator settings."""
import os
import subprocess
import sys
import types

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from engine import BenchConfig, ConfigError, check_runnable, devices, predict
from engine.config import GIB
from engine.measure import run_benchmark
from engine.step import build_step, make_optimizer
from engine.worker import Outcome, Worker
from tests.app_fixtures import app_db  # noqa: F401
from tests.test_step import TINY


def tiny(**changes) -> BenchConfig:
    base = dict(model="gpt-tiny", overrides=TINY, batch=2, warmup=1, steps=2, device="cpu")
    return BenchConfig(**{**base, **changes})


def config_error(**fields) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        BenchConfig(**fields)
    return info.value


# ------------------------------------------------------------------------- optimizers
@pytest.mark.parametrize("optimizer", ["adamw", "sgd", "adafactor"])
@pytest.mark.parametrize("impl", ["auto", "fused", "foreach", "loop"])
def test_each_optimizer_takes_the_implementations_torch_has(optimizer, impl):
    if optimizer == "adafactor" and impl == "fused":
        error = config_error(optimizer=optimizer, optimizer_impl=impl)
        assert error.field == "optimizer_impl" and error.value == "fused"
        assert error.allowed.startswith("auto, foreach, loop with adafactor")
    else:
        assert BenchConfig(optimizer=optimizer, optimizer_impl=impl).optimizer_impl == impl


@pytest.mark.parametrize("optimizer, impl, device, flags", [
    ("adamw", "auto", "cpu", {"foreach": True}),  # what the engine always used off CUDA
    ("adamw", "auto", "cuda", {"fused": True}),  # ... and on CUDA
    ("sgd", "auto", "cuda", {"fused": True}),
    ("adafactor", "auto", "cuda", {"foreach": True}),  # no fused Adafactor: auto falls back
    ("adamw", "fused", "cpu", {"fused": True}),
    ("sgd", "foreach", "cpu", {"foreach": True}),
    ("adamw", "loop", "cpu", {"foreach": False, "fused": None}),
    ("adafactor", "loop", "cpu", {"foreach": False}),
])
def test_make_optimizer_builds_the_implementation_asked_for(optimizer, impl, device, flags):
    model = torch.nn.Linear(4, 3)
    built = make_optimizer(model, optimizer, torch.device(device), impl)
    kind = {"adamw": torch.optim.AdamW, "sgd": torch.optim.SGD, "adafactor": torch.optim.Adafactor}[optimizer]
    assert type(built) is kind
    assert {key: built.defaults.get(key) for key in flags} == flags


def test_make_optimizer_refuses_a_fused_adafactor():
    with pytest.raises(ValueError, match="auto, foreach, loop"):
        make_optimizer(torch.nn.Linear(4, 3), "adafactor", torch.device("cpu"), "fused")


def test_a_torch_without_adafactor_refuses_it_before_the_run(monkeypatch):
    from engine import config as config_module

    monkeypatch.setattr(config_module, "adafactor_available", lambda: False)
    with pytest.raises(ConfigError, match="torch >= 2.5"):
        check_runnable(tiny(optimizer="adafactor"))
    check_runnable(tiny(optimizer="adamw"))


def test_the_cli_refuses_fused_adafactor_in_one_line():
    done = subprocess.run([sys.executable, "-m", "engine", "run", "--optimizer", "adafactor", "--optimizer-impl", "fused",
                           "--device", "cpu"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "optimizer_impl" in done.stderr and "'fused'" in done.stderr


def test_adafactor_state_is_measured_smaller_than_adamw_and_the_analytic_state_matches():
    # Batch 8: the peak falls in backward, where the breakdown's "optimizer" is the state alone
    # (at a peak inside optimizer.step it would also hold the step's scratch tensors).
    measured = {}
    for optimizer in ("adamw", "sgd", "adafactor"):
        config = tiny(batch=8, optimizer=optimizer)
        result = run_benchmark(config)
        assert result.status == "ok", result.error
        measured[optimizer] = result.metrics.memory_breakdown_bytes.optimizer
        analytic = predict.analytic_estimate(config).optimizer
        assert analytic == pytest.approx(measured[optimizer], rel=0.01), optimizer
    assert measured["adafactor"] < measured["sgd"] < measured["adamw"]


def test_the_analytic_adafactor_state_is_what_torch_allocates():
    step = build_step(tiny(optimizer="adafactor", optimizer_impl="loop"))
    step.run()
    state = sum(t.numel() * t.element_size() for s in step.optimizer.state.values() for t in s.values())
    assert predict.analytic_estimate(step.config).optimizer == state
    # Factored: a matrix keeps a row and a column vector, a vector its full variance.
    assert predict.adafactor_state_elems((256, 64)) == 256 + 64
    assert predict.adafactor_state_elems((8, 3, 5)) == 8 * 3 + 8 * 5
    assert predict.adafactor_state_elems((64,)) == 64


def test_on_cuda_the_step_counters_count_only_where_torch_keeps_them_on_the_device():
    shapes = [(256, 64), (64,)]
    n = 256 * 64 + 64
    assert predict.optimizer_state_bytes("adamw", shapes, "cuda", "fused") == 8 * n + 4 * 2
    assert predict.optimizer_state_bytes("adamw", shapes, "cuda", "foreach") == 8 * n  # steps on the host
    assert predict.optimizer_state_bytes("adamw", shapes, "cpu", "foreach") == 8 * n + 4 * 2
    assert predict.optimizer_state_bytes("adafactor", shapes, "cuda") == 4 * (256 + 64 + 64)
    assert predict.optimizer_state_bytes("sgd", shapes, "cuda") == 4 * n


def test_the_optimizer_steps_scratch_depends_on_the_implementation():
    shapes = [(256, 64), (64,)]
    n = 256 * 64 + 64
    assert predict.optimizer_step_transient_bytes("adamw", shapes, "cpu", "foreach") == 4 * n
    assert predict.optimizer_step_transient_bytes("adamw", shapes, "cpu", "loop") == 2 * 4 * 256 * 64
    assert predict.optimizer_step_transient_bytes("adamw", shapes, "cuda", "auto") == 0  # fused
    assert predict.optimizer_step_transient_bytes("adafactor", shapes, "cuda", "auto") == 4 * n  # foreach
    assert predict.optimizer_step_transient_bytes("sgd", shapes, "cpu", "foreach") == 0


@pytest.mark.parametrize("optimizer, impl", [("adamw", "loop"), ("adafactor", "foreach")])
def test_the_analytic_peak_follows_the_implementation(optimizer, impl):
    # Batch 1: the optimizer step sets the peak, with its scratch tensors.
    config = tiny(batch=1, optimizer=optimizer, optimizer_impl=impl)
    peak = run_benchmark(config).metrics.peak_allocated_bytes
    assert predict.analytic_estimate(config).peak == pytest.approx(peak, rel=0.01)


# ------------------------------------------------------------------------- attention
@pytest.mark.parametrize("backend", ["efficient", "cudnn"])
def test_cuda_only_attention_backends_are_refused_on_the_cpu(backend):
    error = config_error(attention=backend, device="cpu")
    assert error.field == "attention" and error.value == backend
    assert "on cpu" in error.allowed and error.allowed.startswith("auto, math, flash")


def test_auto_resolving_to_the_cpu_refuses_a_cuda_only_backend():
    config = tiny(device="auto", attention="efficient")  # a value check cannot know what auto is
    with pytest.raises(ConfigError, match="on cpu"):
        check_runnable(config)


@pytest.mark.parametrize("model", ["mlp", "cnn"])
def test_attention_applies_only_to_models_with_attention(model):
    error = config_error(model=model, attention="math")
    assert error.field == "attention" and "applies only to models with attention" in error.allowed
    assert BenchConfig(model=model, attention="auto").attention == "auto"


def test_flash_and_cudnn_on_cuda_need_half_precision():
    error = config_error(device="cuda", warmup=1, attention="flash")
    assert "fp16 or bf16" in error.allowed
    assert BenchConfig(device="cuda", warmup=1, attention="flash", precision="bf16").attention == "flash"
    assert BenchConfig(device="cuda", warmup=1, attention="efficient").attention == "efficient"


@pytest.fixture
def volta(monkeypatch):
    """A machine whose one CUDA GPU has compute capability 7.0 (as the probe reports it)."""
    gpu = devices.CudaGpu(0, "GPU-vvvv", "Tesla V100-SXM2-16GB", 16 * GIB, (7, 0))
    monkeypatch.setattr(devices, "cuda_gpus", lambda: (gpu,))


def test_a_gpu_of_compute_capability_7_refuses_flash_naming_the_device(volta):
    config = BenchConfig(model="gpt-tiny", overrides=TINY, device="cuda", precision="fp16", warmup=2, attention="flash")
    with pytest.raises(ConfigError) as info:
        check_runnable(config)
    assert info.value.field == "attention"
    assert "Tesla V100-SXM2-16GB" in info.value.allowed and "compute capability 7.0" in info.value.allowed
    assert "flash needs compute capability >= 8.0" in info.value.allowed
    check_runnable(config.replace(attention="efficient"))  # memory-efficient runs from sm50
    check_runnable(config.replace(attention="math"))


def test_the_probe_reports_each_gpus_compute_capability(monkeypatch):
    devices.cuda_gpus.cache_clear()
    monkeypatch.setattr(devices, "_cuda_wheel_expected", lambda: True)
    out = '[{"index": 0, "uuid": "GPU-1", "name": "NVIDIA A100", "total_memory": 1024, "capability": [8, 0]}]'
    monkeypatch.setattr(devices.subprocess, "run", lambda *a, **k: types.SimpleNamespace(stdout=out))
    try:
        assert devices.cuda_gpus()[0].capability == (8, 0)
    finally:
        devices.cuda_gpus.cache_clear()


class _Ops(TorchDispatchMode):
    """Names every aten op that runs."""

    def __init__(self):
        super().__init__()
        self.names: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(func.__name__)
        return func(*args, **(kwargs or {}))


def _ops_of_one_step(config: BenchConfig) -> set[str]:
    step = build_step(config)
    with _Ops() as ops:
        step.run()
    return ops.names


FLASH_CPU = "_scaled_dot_product_flash_attention_for_cpu.default"


def test_the_backend_is_applied_in_forward_and_in_the_backward_recompute():
    assert FLASH_CPU in _ops_of_one_step(tiny(attention="flash"))
    # With full checkpointing the blocks' attention runs again inside backward: math there too.
    math_ops = _ops_of_one_step(tiny(attention="math", ckpt="full"))
    assert not any("flash" in name for name in math_ops)
    assert "_safe_softmax.default" in math_ops  # the math kernel's softmax


def test_the_step_enters_sdpa_kernel_with_the_configs_backend(monkeypatch):
    import torch.nn.attention as attention

    entered = []
    real = attention.sdpa_kernel

    def spy(backends, *args, **kwargs):
        entered.append(backends)
        return real(backends, *args, **kwargs)

    monkeypatch.setattr(attention, "sdpa_kernel", spy)
    build_step(tiny(attention="math")).run()
    assert entered == [attention.SDPBackend.MATH]
    build_step(tiny()).run()  # auto: no restriction
    assert len(entered) == 1


@pytest.mark.parametrize("backend", ["math", "flash"])
def test_math_and_flash_attention_run_on_the_cpu(backend):
    result = run_benchmark(tiny(attention=backend))
    assert result.status == "ok", result.error
    assert result.config.attention == backend and result.metrics.step_ms.median > 0


@pytest.mark.parametrize("backend", ["math", "flash"])
def test_the_analytic_activations_follow_the_attention_backend(backend):
    # The math backend keeps each head's s×s softmax output for backward; flash keeps none.
    config = tiny(batch=8, attention=backend)
    measured = run_benchmark(config).metrics
    estimate = predict.analytic_estimate(config)
    assert estimate.activations == pytest.approx(measured.memory_breakdown_bytes.activations, rel=0.01)
    assert estimate.peak == pytest.approx(measured.peak_allocated_bytes, rel=0.01)


# ------------------------------------------------------------------------- allocator settings
@pytest.mark.parametrize("text", ["expandable_segments:True", "expandable_segments:False",
                                  "expandable_segments:True,max_split_size_mb:128",
                                  "garbage_collection_threshold:0.6, roundup_power2_divisions:4", "backend:native"])
def test_allocator_settings_in_pytorch_syntax(text):
    assert BenchConfig(device="cuda", warmup=1, alloc_conf=text).alloc_conf == text


@pytest.mark.parametrize("text, words", [
    ("expandable_segments:yes", "True or False"),
    ("max_split_size_mb:10", "MiB >= 20"),
    ("roundup_power2_divisions:3", "a power of 2"),
    ("pinned_num_register_threads:8", "with keys expandable_segments"),
    ("expandable_segments", "key:value"),
    ("expandable_segments:True,expandable_segments:False", "twice"),
    ("", "key:value"),
])
def test_allocator_settings_outside_the_allow_list_are_refused(text, words):
    error = config_error(device="cuda", warmup=1, alloc_conf=text)
    assert error.field == "alloc_conf" and words in error.allowed


@pytest.mark.parametrize("device", ["cpu", "mps"])
def test_allocator_settings_need_the_cuda_allocator(device):
    error = config_error(device=device, alloc_conf="expandable_segments:True")
    assert error.field == "alloc_conf" and f"none on {device}" in error.allowed


def test_allocator_settings_with_auto_on_a_cpu_machine_are_refused_before_the_run():
    with pytest.raises(ConfigError, match="none on cpu"):
        check_runnable(tiny(device="auto", alloc_conf="expandable_segments:True"))


def allocator_env(channel) -> tuple:
    """In the worker: its pid, the allocator variables and the fingerprint's allocator settings."""
    return (os.getpid(), os.environ.get("PYTORCH_CUDA_ALLOC_CONF"), os.environ.get("PYTORCH_ALLOC_CONF"),
            devices.allocator_settings())


def test_setting_the_allocator_removes_an_inherited_generic_variable(monkeypatch):
    monkeypatch.setenv("PYTORCH_ALLOC_CONF", "expandable_segments:False")  # torch would read it too
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:64")
    devices.set_alloc_conf("expandable_segments:True")
    assert "PYTORCH_ALLOC_CONF" not in os.environ
    assert devices.allocator_settings() == "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True"


def test_the_worker_gets_the_configs_allocator_settings_and_restarts_when_they_change():
    worker = Worker()
    try:
        def ask(alloc_conf):
            outcome = worker.call(allocator_env, device="cpu", timeout_s=120, alloc_conf=alloc_conf)
            assert outcome.ok, outcome.error
            return outcome.value

        pid, cuda_var, generic_var, fingerprint = ask("expandable_segments:True")
        assert (cuda_var, generic_var) == ("expandable_segments:True", None)
        assert fingerprint == "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True"
        assert ask("expandable_segments:True")[0] == pid  # same settings: the warm worker
        changed = ask("expandable_segments:False,max_split_size_mb:64")
        assert changed[0] != pid and changed[1] == "expandable_segments:False,max_split_size_mb:64"
        # None: a new worker with the environment's own settings (whatever they are), not the last config's.
        inherited = ask(None)
        assert inherited[0] != changed[0] and inherited[1] != changed[1]
    finally:
        worker.close()


def test_a_cuda_run_hands_its_allocator_settings_to_the_worker(monkeypatch):
    calls = []

    def fake_call(self, func, *args, **kwargs):
        calls.append(kwargs)
        return Outcome("error", error="no GPU here")

    monkeypatch.setattr(Worker, "call", fake_call)
    config = BenchConfig(device="cuda", warmup=1, alloc_conf="expandable_segments:True")
    result = Worker("GPU-test").run(config)
    assert result.status == "error" and calls[0]["alloc_conf"] == "expandable_segments:True"


def test_a_timeline_runs_in_a_worker_with_its_allocator_settings(monkeypatch):
    from engine import timeline

    calls = []
    monkeypatch.setattr(timeline, "call", lambda *args, **kwargs: calls.append(kwargs) or Outcome("ok", []))
    config = BenchConfig(device="cuda", warmup=1, alloc_conf="expandable_segments:True")
    timeline.timelines([config, config.replace(ckpt="full")])
    assert calls[0]["alloc_conf"] == "expandable_segments:True" and calls[0]["fresh"]
    with pytest.raises(ValueError, match="one allocator setting"):
        timeline.timelines([config, config.replace(alloc_conf=None)])


# ------------------------------------------------------------------------- in words
def test_descriptions_and_labels_name_the_new_settings():
    from app.charts.runs import run_labels
    from app.tables import runs_frame
    from tests.factories import make_result

    config = BenchConfig(device="cuda", warmup=1, precision="bf16", optimizer="adafactor", optimizer_impl="loop",
                         attention="flash", alloc_conf="expandable_segments:True")
    words = config.describe()
    for part in ("adafactor", "loop optimizer step", "flash attention", "allocator expandable_segments:True"):
        assert part in words
    assert "attention" not in BenchConfig().describe() and "optimizer step" not in BenchConfig().describe()

    from engine.cli.common import format_table, result_line

    run = make_result(optimizer="sgd", optimizer_impl="loop")
    assert "sgd loop optimizer step" in result_line(run)
    header, _, row = format_table([run]).splitlines()
    assert "settings" in header and "opt ms" in header and "sgd, loop optimizer step" in row

    runs = [make_result(attention="math"), make_result(attention="flash")]
    assert [label.split(" · ")[-1] for label in run_labels(runs)] == ["math attention", "flash attention"]
    frame = runs_frame(runs)
    assert list(frame["attention"]) == ["math", "flash"]
    assert {"optimizer", "optimizer impl", "alloc conf"} <= set(frame.columns)


def test_the_form_offers_the_new_fields_and_names_a_misplaced_allocator_setting(app_db):  # noqa: F811
    from tests.app_fixtures import open_app, shown

    at = open_app()
    assert at.sidebar.selectbox(key="config.optimizer_impl").options == ["auto", "fused", "foreach", "loop"]
    assert "flash" in at.sidebar.selectbox(key="config.attention").options
    at.sidebar.selectbox(key="config.device").set_value("cpu")
    at.sidebar.text_input(key="config.alloc_conf").set_value("expandable_segments:True").run()
    assert any("alloc_conf" in shown(e.value) and "none on cpu" in shown(e.value) for e in at.error)
    at.sidebar.text_input(key="config.alloc_conf").set_value("").run()  # cleared: none again
    assert not [e for e in at.error if "alloc_conf" in shown(e.value)]


def test_adafactor_on_cuda_is_said_to_synchronise_every_step():
    from engine.measure import ADAFACTOR_SYNC_WARNING, _model_warnings

    def step_on(device: str):
        return types.SimpleNamespace(device=torch.device(device), checkpointed=None, model=torch.nn.Linear(2, 2))

    config = BenchConfig(device="cpu", optimizer="adafactor")
    assert ADAFACTOR_SYNC_WARNING in _model_warnings(step_on("cuda"), config)
    assert ADAFACTOR_SYNC_WARNING not in _model_warnings(step_on("cpu"), config)
    assert ADAFACTOR_SYNC_WARNING not in _model_warnings(step_on("cuda"), config.replace(optimizer="adamw"))


def test_allocator_settings_the_config_chose_are_not_the_environments(monkeypatch):
    from engine import measure

    inherited = "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True"
    monkeypatch.setattr(measure, "env_info", lambda device: {"device_type": "cuda", "alloc_conf": inherited})
    chosen = BenchConfig(device="cuda", warmup=1, alloc_conf="expandable_segments:True")
    assert measure.run_environment(chosen, "cuda")["alloc_conf"] is None  # compared as a setting
    assert measure.run_environment(chosen.replace(alloc_conf=None), "cuda")["alloc_conf"] == inherited
