"""Memory timeline: one optimizer step's memory with phase bands, on CPU (and CUDA on a GPU)."""
import json

import pytest

from engine import cli, memory
from engine.config import BenchConfig
from engine.step import build_step
from engine.timeline import phase_peaks, record_timeline, timelines

TINY = {"n_layers": 2, "seq_len": 32, "d_model": 64, "n_heads": 2, "vocab": 256}


def tiny(**fields) -> BenchConfig:
    return BenchConfig(**{"model": "gpt-tiny", "overrides": TINY, "device": "cpu", "batch": 4, "warmup": 1, **fields})


def test_cpu_timeline_has_the_phases_and_the_breakdowns_peak():
    record = record_timeline(tiny())
    assert [b["phase"] for b in record["phases"]] == ["forward", "backward", "optimizer"]
    assert record["t_ms"] == sorted(record["t_ms"]) and len(record["t_ms"]) == len(record["bytes"])
    # The same live-tensor view as the MemTracker breakdown of the same step.
    step = build_step(tiny())
    step.run()
    assert record["peak_bytes"] == pytest.approx(memory.memory_breakdown(step).total, rel=0.01)
    # Forward grows memory, backward peaks and releases it, the step ends where it began.
    assert record["peak_phase"] == "backward"
    peaks = {row["phase"]: row for row in phase_peaks(record)}
    assert peaks["forward"]["max_bytes"] > record["baseline_bytes"]
    assert record["bytes"][-1] == pytest.approx(record["baseline_bytes"], abs=1024)


def test_full_checkpointing_lowers_the_forward_and_accumulation_repeats_phases():
    none, full = record_timeline(tiny()), record_timeline(tiny(ckpt="full"))
    assert max(row["max_bytes"] for row in phase_peaks(full) if row["phase"] == "forward") < \
        max(row["max_bytes"] for row in phase_peaks(none) if row["phase"] == "forward")
    accumulated = record_timeline(tiny(accum=2))
    assert [b["phase"] for b in accumulated["phases"]] == ["forward 1", "backward 1", "forward 2", "backward 2", "optimizer"]


def test_timeline_command_overlays_a_second_config(capsys):
    flags = ["--model", "gpt-tiny", "--device", "cpu", "--batch", "4", "--warmup", "1"] + [f"--set={k}={v}" for k, v in TINY.items()]
    assert cli.main(["timeline", *flags, "--vs", "ckpt=full", "--json"]) == 0
    records = json.loads(capsys.readouterr().out)
    assert [r["config"]["ckpt"] for r in records] == ["none", "full"]
    assert records[1]["peak_bytes"] < records[0]["peak_bytes"]


def test_a_failure_in_the_worker_is_an_outcome_not_raised_through():
    outcome = timelines([BenchConfig(model="tests.helper_models:oom_above_2", batch=4, device="cpu", warmup=1)])
    assert outcome.status == "oom" and "micro-batch 4 > 2" in outcome.error and outcome.value is None


def test_the_timeline_command_reports_a_failure_as_one_line_and_exit_1(capsys):
    args = ["timeline", "--model", "tests.helper_models:oom_above_2", "--batch", "4", "--device", "cpu", "--warmup", "1"]
    assert cli.main(args) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("oom: ")


@pytest.mark.gpu
def test_cuda_timeline_from_the_allocator_history():
    import torch

    config = BenchConfig(model="gpt-tiny", batch=8, device="cuda", warmup=1)
    record = record_timeline(config)
    assert record["source"].startswith("CUDA")
    assert [b["phase"] for b in record["phases"]] == ["forward", "backward", "optimizer"]
    assert record["peak_phase"] in ("forward", "backward")
    step = build_step(config)
    step.run()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    step.run()
    torch.cuda.synchronize()
    # The allocator's own peak for the same step, within a few allocator blocks.
    assert record["peak_bytes"] == pytest.approx(torch.cuda.max_memory_allocated() - torch.cuda.memory_allocated()
                                                 + record["baseline_bytes"], rel=0.05)
