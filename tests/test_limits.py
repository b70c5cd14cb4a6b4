"""Limits for a shared server: caps where a run is requested (check_runnable, sweep.expand, the
CLI), never where stored results are read; and the pre-run memory check with --force."""
import time

import pytest

from engine import BenchConfig, ConfigError, check_runnable, cli
from engine import finder
from engine import worker as worker_module
from engine.limits import check_field_limit, check_memory, limit_for
from engine.results import parse_results
from engine.store import Store, import_bundle
from engine.sweep import expand
from tests.factories import make_result

CPU = {"device": "cpu"}
TINY_DIMS = {"n_layers": 1, "seq_len": 16, "d_model": 32, "n_heads": 2, "vocab": 64}


@pytest.mark.parametrize("field, value, variable, cap", [
    ("batch", 100_000_000, "TRADEOFF_LAB_MAX_BATCH", "65536"),
    ("accum", 10**15, "TRADEOFF_LAB_MAX_ACCUM", "1024"),
    ("warmup", 10**6, "TRADEOFF_LAB_MAX_WARMUP", "100"),
    ("steps", 10**9, "TRADEOFF_LAB_MAX_STEPS", "1000"),
    ("timeout_s", 1e12, "TRADEOFF_LAB_MAX_TIMEOUT_S", "3600"),
])
def test_values_above_the_servers_caps_are_refused_naming_field_value_and_limit(field, value, variable, cap):
    with pytest.raises(ConfigError) as info:
        check_runnable(BenchConfig(**CPU, **{field: value}))
    error = info.value
    assert (error.field, error.value) == (field, value)
    assert error.allowed.startswith(f"at most {cap} on this server ({variable};")
    with pytest.raises(ConfigError):
        check_field_limit(field, value)  # the same check, one value at a time (links, forms)
    assert limit_for(field) == float(cap)


def test_a_setting_moves_the_cap_and_a_bad_setting_is_named(monkeypatch):
    monkeypatch.setenv("TRADEOFF_LAB_MAX_STEPS", "5")
    check_field_limit("steps", 5)
    with pytest.raises(ConfigError, match="at most 5 on this server"):
        check_runnable(BenchConfig(**CPU, steps=6))
    monkeypatch.setenv("TRADEOFF_LAB_MAX_STEPS", "lots")
    with pytest.raises(ConfigError) as info:
        check_field_limit("steps", 1)
    assert info.value.field == "TRADEOFF_LAB_MAX_STEPS"
    assert limit_for("seed") is None
    check_field_limit("seed", 10**12)  # no cap on that field


def test_caps_never_apply_to_reading_stored_results(tmp_path):
    long_run = make_result(batch=2, steps=5000, warmup=500, timeout_s=86400.0)
    [read] = parse_results(long_run.to_json(), "teammate.jsonl")
    assert read.config.steps == 5000
    outcome = import_bundle(Store(tmp_path / "runs.sqlite"), "teammate.jsonl", long_run.to_json().encode())
    assert outcome.ok and outcome.added == 1


def test_a_million_config_sweep_is_refused_before_any_config_is_built(monkeypatch):
    started = time.monotonic()
    with pytest.raises(ConfigError) as info:
        expand(CPU, {"batch": list(range(1, 1001)), "accum": list(range(1, 1001))})
    assert time.monotonic() - started < 0.5
    assert info.value.field == "sweep" and "1,000,000 configurations" in str(info.value)
    assert "at most 1,000 configurations on this server (TRADEOFF_LAB_MAX_SWEEP)" in str(info.value)
    monkeypatch.setenv("TRADEOFF_LAB_MAX_SWEEP", "4")
    assert len(expand(CPU, {"batch": [1, 2], "precision": ["fp32", "bf16"]})[0]) == 4
    with pytest.raises(ConfigError, match="'6 configurations'"):
        expand(CPU, {"batch": [1, 2, 3], "precision": ["fp32", "bf16"]})


# ------------------------------------------------------------------------- memory check
TINY_UNDER_CAP = BenchConfig(**CPU, overrides=TINY_DIMS, batch=2, memory_cap_gib=0.00001)


def test_a_config_far_beyond_the_device_is_refused_with_its_estimate(monkeypatch):
    with pytest.raises(ConfigError) as info:
        check_runnable(TINY_UNDER_CAP)
    message = str(info.value)
    assert "the analytic estimate of its peak memory is about 0.29 MiB" in message
    assert "more than 4× its 1e-05 GiB memory cap" in message and "--force" in message
    check_runnable(TINY_UNDER_CAP, check_memory=False)  # what --force and the batch finder ask for
    check_runnable(TINY_UNDER_CAP.replace(memory_cap_gib=None))  # fits the machine
    monkeypatch.setenv("TRADEOFF_LAB_MEMORY_FACTOR", "0")  # the check switched off
    check_memory(TINY_UNDER_CAP)


def test_a_model_without_an_activation_formula_is_judged_by_its_exact_state():
    huge_mlp = BenchConfig(**CPU, model="mlp", overrides={"width": 1_000_000}, memory_cap_gib=1.0)
    with pytest.raises(ConfigError, match=r"peak memory is at least [0-9.]+ GiB, more than 4× its 1 GiB memory cap"):
        check_memory(huge_mlp)


TINY_ARGS = ["--model", "gpt-tiny", *(a for k, v in TINY_DIMS.items() for a in ("--set", f"{k}={v}")),
             "--batch", "2", "--device", "cpu", "--memory-cap-gib", "0.00001"]


@pytest.fixture
def fake_run(monkeypatch):
    """Benchmarks return a synthetic result at once; returns the configs run."""
    ran = []

    def run(config, progress=None, cancel=None, sweep_id=None, device=None):
        ran.append(config)
        return make_result(batch=config.batch).replace(sweep_id=sweep_id)

    monkeypatch.setattr(worker_module, "run", run)
    monkeypatch.setattr(worker_module.Worker, "run", lambda self, *args, **kwargs: run(*args, **kwargs))
    monkeypatch.setattr(worker_module.Worker, "start", lambda self: None)
    return ran


@pytest.mark.parametrize("command", ["run", "sweep"])
def test_the_cli_refuses_it_unless_forced(command, fake_run, capsys):
    assert cli.main([command, *TINY_ARGS]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "the analytic estimate of its peak memory" in err
    assert fake_run == []
    assert cli.main([command, *TINY_ARGS, "--force"]) == 0
    assert [c.memory_cap_gib for c in fake_run] == [0.00001]


def test_the_batch_finder_is_not_memory_checked_but_its_max_batch_is_capped(monkeypatch, capsys):
    searched = []

    def find_batch(config, **kwargs):
        searched.append(config)
        return {"trials": [], "max_batch": None, "best_batch": None, "budget_bytes": 1, "capacity_bytes": 1,
                "exact": True, "stopped": None}

    monkeypatch.setattr(finder, "find_batch", find_batch)
    assert cli.main(["find-batch", *TINY_ARGS, "--json"]) == 1  # searched (nothing fits), not refused
    assert len(searched) == 1
    capsys.readouterr()
    assert cli.main(["find-batch", *TINY_ARGS, "--max-batch", "100000000"]) == 2
    assert "--max-batch: 100000000 is above this server's largest micro-batch, 65536" in capsys.readouterr().err


def test_predict_caps_the_batches_it_would_measure(fake_run, capsys):
    assert cli.main(["predict", "--model", "gpt-tiny", "--device", "cpu", "--batches", "1,100000000"]) == 2
    assert "batch: invalid value 100000000; allowed: at most 65536" in capsys.readouterr().err
    assert fake_run == []


def test_every_limit_is_in_the_readmes_settings_table_with_its_default():
    from engine.limits import FIELD_LIMITS, MAX_SWEEP, MEMORY_FACTOR
    from tests.conftest import ROOT

    with open(f"{ROOT}/README.md", encoding="utf-8") as f:
        rows = {line.split("|")[1].strip(" `"): line.split("|")[-2].strip() for line in f if line.startswith("| `")}
    for limit in (*FIELD_LIMITS, MAX_SWEEP, MEMORY_FACTOR):
        assert rows.get(limit.variable) == f"{limit.default:g}", limit.variable
