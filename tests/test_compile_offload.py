"""torch.compile (``compile``) and activation offloading (``ckpt`` offload): compile time is
reported apart and never inside a timed step, a compiler failure is an error result, every
checkpointing policy runs compiled, offloading copies saved activations to the host (pinned
only on CUDA) and says where that saves nothing."""
import itertools
import time

import pytest
import torch

from engine import checkpointing, cli
from engine.config import CKPT_POLICIES, FIELDS_BY_NAME, SWEEP_FIELDS, BenchConfig, ConfigError, ckpt_words, sweep_values
from engine.measure import OFFLOAD_ON_HOST_WARNING, compile_seconds, run_benchmark
from engine.predict import analytic_estimate
from engine.results import Result, read_results
from engine.step import build_step
from engine.worker import benchmark_in_worker

TINY = {"n_layers": 2, "seq_len": 16, "d_model": 64, "n_heads": 2, "vocab": 256}
DELAY_S = 2.0


def tiny(**fields) -> BenchConfig:
    return BenchConfig(**{"model": "gpt-tiny", "overrides": TINY, "batch": 2, "warmup": 2, "steps": 3,
                          "device": "cpu", **fields})


@pytest.fixture
def compile_with(monkeypatch):
    """``compile_with(backend)``: torch.compile (as nn.Module.compile calls it) uses ``backend``
    instead of inductor; dynamo still traces, so compilation happens in the first step."""
    real = torch.compile

    def install(backend):
        monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: real(fn, backend=backend))
    return install


def sleepy_backend(gm, example_inputs):
    time.sleep(DELAY_S)  # a slow compiler
    return gm.forward


# ------------------------------------------------------------------------------ config
def test_compile_is_one_declared_field_with_flag_choices_and_sweep_values():
    field = FIELDS_BY_NAME["compile"]
    assert field.flag == "--compile" and field.choices == ("none", "default", "max-autotune")
    assert "compile" in SWEEP_FIELDS and sweep_values(field) == ["none", "default"]
    assert BenchConfig().compile == "none"
    assert BenchConfig.from_dict({k: v for k, v in BenchConfig().to_dict().items() if k != "compile"}).compile == "none"


@pytest.mark.parametrize("device, precision, need", [("cpu", "fp32", 2), ("cuda", "fp32", 2), ("cuda", "fp16", 2)])
def test_a_compiled_run_needs_two_warmup_steps_and_the_error_names_the_field(device, precision, need):
    with pytest.raises(ConfigError) as info:
        BenchConfig(device=device, precision=precision, compile="default", warmup=need - 1)
    assert info.value.field == "warmup"
    assert f">= {need}" in str(info.value) and "with compile default" in str(info.value)
    assert "recompile" in str(info.value)
    BenchConfig(device=device, precision=precision, compile="max-autotune", warmup=need)
    BenchConfig(device="cpu", warmup=0)  # eager on the CPU needs none


def test_offload_is_a_checkpointing_value_in_words_and_wraps_no_block():
    assert "offload" in CKPT_POLICIES
    assert ckpt_words("offload", 2) == "activations offloaded to host memory"
    assert "compiled (default)" in tiny(compile="default").describe()
    step = build_step(tiny(ckpt="offload"))
    assert step.checkpointed is None
    assert not any(isinstance(m, checkpointing.CheckpointedBlock) for m in step.model.modules())
    assert not FIELDS_BY_NAME["blocks"].applies(tiny(ckpt="offload"))


def test_every_checkpointing_policy_has_a_chart_pattern_of_its_own():
    from app.charts.common import CKPT_PATTERNS

    assert set(CKPT_PATTERNS) == set(CKPT_POLICIES)
    assert len(set(CKPT_PATTERNS.values())) == len(CKPT_PATTERNS)


# ------------------------------------------------------------------------------ compile time
def test_compile_seconds_is_what_compiling_warmup_steps_took_beyond_a_measured_step():
    assert compile_seconds([3.0, 0.5], step_s=0.2) == pytest.approx(2.8 + 0.3)
    assert compile_seconds([0.1], step_s=0.2) == 0.0  # never negative
    assert compile_seconds([], step_s=0.2) == 0.0


def test_an_injected_slow_compile_is_reported_as_compile_s_and_never_inside_a_timed_step(compile_with):
    compile_with(sleepy_backend)
    compiled = run_benchmark(tiny(compile="default"))
    eager = run_benchmark(tiny())
    assert compiled.ok and eager.ok
    assert compiled.metrics.compile_s >= DELAY_S
    assert eager.metrics.compile_s is None
    # Compilation happened in warm-up: had it leaked into a timed step, that step would take
    # at least the injected delay.
    assert max(compiled.samples["step_ms"]) < DELAY_S * 1000
    assert compiled.metrics.step_ms.median < DELAY_S * 1000 / 2
    assert not any("compiled again" in w or "compiled no graph" in w for w in compiled.warnings)
    assert any("uncompiled (eager) instrumented step" in w for w in compiled.warnings)
    # compile_s round-trips through the file format; an old file without it reads None.
    data = compiled.to_dict()
    assert Result.from_dict(data).metrics.compile_s == compiled.metrics.compile_s
    del data["metrics"]["compile_s"]
    assert Result.from_dict(data).metrics.compile_s is None


def test_the_cpu_peak_seen_at_the_allocator_agrees_with_the_breakdown_on_an_eager_step():
    from engine import memory

    step = build_step(tiny(batch=4))
    step.run()  # optimizer state exists, as after warm-up
    # the same peak, to within a few scalars' bytes
    assert abs(memory.cpu_step_peak_bytes(step) - memory.memory_breakdown(step).total) <= 64


def test_compiled_checkpointing_updates_batch_norm_statistics_once_per_step(compile_with):
    compile_with("aot_eager")
    stats = {}
    for ckpt in ("none", "full"):
        step = build_step(BenchConfig(model="cnn", device="cpu", batch=2, ckpt=ckpt, compile="default"))
        step.run()
        step.run()
        layers = [m for m in step.model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        stats[ckpt] = [(int(m.num_batches_tracked), m.running_mean.clone()) for m in layers]
    assert all(count == 2 for count, _ in stats["full"])
    assert all(torch.allclose(a, b) for (_, a), (_, b) in zip(stats["none"], stats["full"]))


def test_a_compilation_in_the_timed_steps_or_none_at_all_is_said(monkeypatch, compile_with):
    from engine import measure

    compile_with("eager")
    counter = itertools.count()
    monkeypatch.setattr(measure, "compiled_graphs", lambda: next(counter))  # a graph at every look
    again = run_benchmark(tiny(compile="default", steps=1))
    assert any("compiled again during the timed steps" in w for w in again.warnings)
    monkeypatch.setattr(measure, "compiled_graphs", lambda: 0)  # never a graph
    never = run_benchmark(tiny(compile="default", steps=1))
    assert never.metrics.compile_s == 0.0
    assert any("compiled no graph during warm-up" in w for w in never.warnings)


class _Channel:
    def progress(self, event):
        pass

    def env(self, env):
        pass


def test_a_compiler_failure_is_an_error_result_with_the_compilers_message(compile_with):
    def broken_backend(gm, example_inputs):
        raise RuntimeError("fake inductor failure: unsupported operator")

    compile_with(broken_backend)
    result = benchmark_in_worker(tiny(compile="default"), None, _Channel())
    assert result.status == "error"
    assert "fake inductor failure: unsupported operator" in result.error
    assert result.metrics.compile_s is None
    # The process that hit it keeps working.
    assert benchmark_in_worker(tiny(steps=1), None, _Channel()).ok


@pytest.mark.parametrize("ckpt", CKPT_POLICIES)
def test_every_checkpointing_policy_runs_compiled(compile_with, ckpt):
    # aot_eager traces with dynamo and AOT autograd (where checkpointing and saved-tensor
    # hooks meet the compiler) without inductor's C++ build, to keep this test fast.
    compile_with("aot_eager")
    result = run_benchmark(tiny(compile="default", ckpt=ckpt, steps=1))
    assert result.ok, result.error
    assert result.metrics.compile_s is not None
    # the same gradients as eager fp32 without checkpointing (CPU: exactly the same maths)
    assert result.metrics.grad_rel_diff < 1e-5


# ------------------------------------------------------------------------------ offload
@pytest.mark.parametrize("device_type, pinned", [("cuda", True), ("cpu", False)])
def test_offload_pins_host_memory_only_on_cuda(monkeypatch, device_type, pinned):
    seen = []
    monkeypatch.setattr(torch.autograd.graph, "save_on_cpu", lambda pin_memory: seen.append(pin_memory) or "ctx")
    assert checkpointing.make_policy("offload").forward_context(torch.device(device_type)) == "ctx"
    assert seen == [pinned]


@pytest.fixture
def packed(monkeypatch):
    """The shapes of the tensors offloading's pack hook receives."""
    shapes = []
    real = torch.autograd.graph.save_on_cpu

    def counting(pin_memory):
        hooks = real(pin_memory=pin_memory)
        pack = hooks.pack_hook
        hooks.pack_hook = lambda tensor: shapes.append(tensor.shape) or pack(tensor)
        return hooks

    monkeypatch.setattr(torch.autograd.graph, "save_on_cpu", counting)
    return shapes


def test_offload_sends_every_saved_activation_through_the_host_hooks_with_the_same_gradients(packed):
    grads = {}
    for ckpt in ("none", "offload"):
        step = build_step(tiny(ckpt=ckpt))
        handle = step.optimizer.register_step_pre_hook(
            lambda opt, args, kwargs, ckpt=ckpt: grads.__setitem__(ckpt, [p.grad.clone() for p in step.model.parameters()]))
        step.run()
        handle.remove()
    assert len(packed) > 10  # every block's saved tensors, and the loss's
    assert all(torch.equal(a, b) for a, b in zip(grads["none"], grads["offload"]))


def test_compiled_code_still_offloads_what_it_saves(compile_with, packed):
    compile_with("aot_eager")
    step = build_step(tiny(ckpt="offload", compile="default"))
    for _ in range(2):  # the compiling step and a compiled one
        before = len(packed)
        step.run()
        assert len(packed) - before > 10


def test_offload_on_the_cpu_says_it_saves_no_device_memory():
    result = run_benchmark(tiny(ckpt="offload", warmup=1, steps=2))
    assert result.ok
    assert OFFLOAD_ON_HOST_WARNING.format(device="CPU") in result.warnings
    assert result.metrics.grad_rel_diff == 0.0
    assert run_benchmark(tiny(warmup=1, steps=1)).warnings.count(OFFLOAD_ON_HOST_WARNING.format(device="CPU")) == 0


def test_the_analytic_estimate_counts_offloaded_activations_off_the_device_only_on_cuda():
    config = BenchConfig(model="gpt-tiny", batch=8)
    none_cuda = analytic_estimate(config, device_type="cuda")
    offload_cuda = analytic_estimate(config.replace(ckpt="offload"), device_type="cuda")
    none_cpu = analytic_estimate(config, device_type="cpu")
    offload_cpu = analytic_estimate(config.replace(ckpt="offload"), device_type="cpu")
    assert offload_cuda.activations == 0 < none_cuda.activations
    assert offload_cuda.peak < none_cuda.peak
    assert any("offloaded to host memory" in note for note in offload_cuda.notes)
    assert (offload_cpu.activations, offload_cpu.peak) == (none_cpu.activations, none_cpu.peak)


# ------------------------------------------------------------------------------ acceptance
@pytest.mark.timeout(600)  # inductor compiles twice for real, in C++, on a shared 2-core machine
def test_a_compile_by_offload_sweep_through_the_cli_gives_four_ok_results(tmp_path, capsys):
    """The real path: CLI, sweep, worker process, inductor."""
    out = tmp_path / "sweep.jsonl"
    # A real vocabulary: the loss's log-probabilities dominate memory, which compiled code keeps less of.
    dims = [arg for key, value in {**TINY, "seq_len": 64, "vocab": 8192}.items() for arg in ("--set", f"{key}={value}")]
    argv = ["sweep", "--model", "gpt-tiny", *dims, "--batch", "2", "--warmup", "2", "--steps", "2", "--device", "cpu",
            "--compile", "none,default", "--ckpt", "none,offload", "--out", str(out)]
    assert cli.main(argv) == 0, capsys.readouterr().err
    results = read_results(out)
    assert sorted((r.config.compile, r.config.ckpt) for r in results) == [
        ("default", "none"), ("default", "offload"), ("none", "none"), ("none", "offload")]
    assert all(r.ok for r in results), [r.error for r in results]
    for r in results:
        assert (r.metrics.compile_s is None) == (r.config.compile == "none"), (r.config.compile, r.metrics.compile_s)
        # (> 0 is not certain: with inductor's cache warm, compiling can take less than a noisy step)
        assert r.metrics.compile_s is None or r.metrics.compile_s >= 0
        # The eager breakdown's total is an eager run's peak; a compiled run reports its own.
        eager_peak = r.metrics.memory_breakdown_bytes.total
        if r.config.compile == "none":
            assert r.metrics.peak_allocated_bytes == eager_peak
        else:
            assert r.metrics.peak_allocated_bytes < eager_peak
    captured = capsys.readouterr()
    # each compiled result's line says its compile time
    assert captured.err.count("s (not in step time)") == 2, captured.err
    header, _, *rows = captured.out.splitlines()
    assert "compile s" in header and len(rows) == 4


def test_the_command_line_ends_a_compiled_runs_worker_without_leaking_its_compiler_pool(tmp_path):
    """`python -m engine` stops its workers politely, so inductor's worker pool ends with
    them instead of leaving semaphores for the resource tracker to report."""
    import subprocess
    import sys

    dims = [arg for key, value in TINY.items() for arg in ("--set", f"{key}={value}")]
    done = subprocess.run([sys.executable, "-m", "engine", "run", "--model", "gpt-tiny", *dims, "--batch", "2",
                           "--warmup", "2", "--steps", "1", "--device", "cpu", "--compile", "default",
                           "--out", str(tmp_path / "run.jsonl")], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "s (not in step time)" in done.stderr and "leaked" not in done.stderr, done.stderr
