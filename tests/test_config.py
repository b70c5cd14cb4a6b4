"""BenchConfig: every invalid field raises ConfigError naming the field, value and what is allowed."""
import dataclasses
import subprocess
import sys

import pytest

from engine import BenchConfig, ConfigError, check_runnable
from engine import config as config_module
from engine import devices
from engine.config import CONFIG_FIELDS, FIELD_NAMES, FIELDS_BY_NAME, GIB
from engine.devices import device_capacity_bytes
from tests.conftest import ROOT

CPU = {"device": "cpu"}
HELPERS = "tests.helper_models"


def _error(**fields) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        BenchConfig(**fields)
    return info.value


def _runnable_error(**fields) -> ConfigError:
    """The error of building the config or, failing that, of ``check_runnable`` (the checks
    that need this machine)."""
    with pytest.raises(ConfigError) as info:
        check_runnable(BenchConfig(**fields))
    return info.value


@pytest.mark.parametrize("fields, field, value", [
    ({"batch": 0}, "batch", 0),
    ({"batch": True}, "batch", True),
    ({"batch": 2.0}, "batch", 2.0),
    ({"accum": -1}, "accum", -1),
    ({"precision": "fp8"}, "precision", "fp8"),
    ({"ckpt": "some"}, "ckpt", "some"),
    ({"k": 0}, "k", 0),
    ({"optimizer": "lion"}, "optimizer", "lion"),
    ({"warmup": -1}, "warmup", -1),
    ({"steps": 0}, "steps", 0),
    ({"seed": -5}, "seed", -5),
    ({"timeout_s": 0}, "timeout_s", 0),
    ({"timeout_s": True}, "timeout_s", True),
    ({"device": "gpu"}, "device", "gpu"),
    ({"device": "cuda:x"}, "device", "cuda:x"),
    ({"memory_cap_gib": 0}, "memory_cap_gib", 0),
    ({"memory_cap_gib": -1.5}, "memory_cap_gib", -1.5),
    ({"memory_cap_gib": True}, "memory_cap_gib", True),
    ({"memory_cap_gib": float("nan")}, "memory_cap_gib", float("nan")),
    ({"timeout_s": float("inf")}, "timeout_s", float("inf")),
    ({"batch": 10**30}, "batch", 10**30),
    ({"model": "gpt-huge"}, "model", "gpt-huge"),
    ({"model": ""}, "model", ""),
    ({"model": 3}, "model", 3),
    ({"overrides": [("seq_len", 8)]}, "overrides", [("seq_len", 8)]),
    ({"overrides": {"depth_of_field": 2}}, "overrides.depth_of_field", 2),
    ({"overrides": {"seq_len": 0}}, "overrides.seq_len", 0),
    ({"overrides": {"seq_len": "long"}}, "overrides.seq_len", "long"),
    ({"overrides": {"d_model": 64, "n_heads": 5}}, "overrides.n_heads", 5),
    ({"model": "mlp", "overrides": {"seq_len": 8}}, "overrides.seq_len", 8),
])
def test_invalid_field_names_field_value_and_allowed(fields, field, value):
    error = _error(**{**CPU, **fields})
    assert error.field == field
    assert error.value == value or (value != value and error.value != error.value)  # nan is the one unequal value
    assert error.allowed
    shown = repr(value) if not isinstance(value, int) or value < 10**30 else "<an integer of 31 digits>"
    assert str(error).startswith(f"{field}: invalid value {shown}; allowed: ")


def test_messages_list_what_is_allowed():
    assert "fp32, fp16, bf16" in str(_error(device="cpu", precision="fp8"))
    assert "none, full, every-k, selective" in str(_error(device="cpu", ckpt="some"))
    assert "adamw, sgd" in str(_error(device="cpu", optimizer="lion"))
    assert "gpt-tiny" in str(_error(device="cpu", model="gpt-huge"))
    assert "divisor of d_model (64)" in str(_error(device="cpu", overrides={"d_model": 64, "n_heads": 5}))


@pytest.mark.parametrize("model, fields, phrase", [
    ("nosuch_module_xyz:build", {}, "ModuleNotFoundError"),
    (f"{HELPERS}:no_such_builder", {}, "AttributeError"),
    (f"{HELPERS}:", {}, "module:function with both parts"),
    (f"{HELPERS}:returns_model_only", {}, "must return (model, make_batch)"),
    (f"{HELPERS}:returns_wrong_types", {}, "expected torch.nn.Module"),
    (f"{HELPERS}:builder_raises", {}, "this builder always fails"),
    (f"{HELPERS}:sleepy_backward", {"overrides": {"seq_len": 8}}, "no overrides"),
])
def test_user_models_that_do_not_import_or_break_the_contract(model, fields, phrase):
    error = _runnable_error(model=model, device="cpu", **fields)
    assert error.field in ("model", "overrides")
    assert phrase in str(error)


def test_a_user_model_is_imported_only_when_checked_runnable():
    # Building the config (e.g. from a stored result) never runs user code.
    config = BenchConfig(model="nosuch_module_xyz:build", device="cpu")
    assert config.model == "nosuch_module_xyz:build"


def test_a_builder_that_calls_sys_exit_is_a_config_error():
    assert "SystemExit" in str(_runnable_error(model="builtins:exit", device="cpu"))


def test_user_model_that_honours_the_contract_is_accepted():
    config = BenchConfig(model=f"{HELPERS}:sleepy_backward", device="cpu")
    check_runnable(config)
    assert config.model.endswith(":sleepy_backward")


def test_memory_cap_larger_than_the_device():
    capacity = device_capacity_bytes("cpu")
    error = _runnable_error(device="cpu", memory_cap_gib=capacity / GIB * 2)
    assert error.field == "memory_cap_gib" and "at most the device's" in str(error)
    check_runnable(BenchConfig(device="cpu", memory_cap_gib=0.5))


def test_cuda_without_a_gpu(monkeypatch):
    # Pretend no GPU is present, so the check runs the same on GPU machines.
    monkeypatch.setattr(devices, "cuda_device_count", lambda: 0)
    for device in ("cuda", "cuda:0"):
        error = _runnable_error(device=device)
        assert error.field == "device" and "no CUDA GPU is present" in str(error)


def test_cuda_index_past_the_last_gpu(monkeypatch):
    monkeypatch.setattr(devices, "cuda_device_count", lambda: 2)
    error = _runnable_error(device="cuda:2")
    assert error.field == "device" and "cuda:0 .. cuda:1" in error.allowed


def test_mps_when_unavailable(monkeypatch):
    monkeypatch.setattr(devices, "mps_available", lambda: False)
    assert "MPS is not available" in str(_runnable_error(device="mps"))


def test_selective_checkpointing_needs_a_torch_that_has_it(monkeypatch):
    check_runnable(BenchConfig(device="cpu", ckpt="selective"))  # torch >= 2.4 here
    monkeypatch.setattr(config_module, "selective_checkpoint_available", lambda: False)
    error = _runnable_error(device="cpu", ckpt="selective")
    assert error.field == "ckpt" and "torch >= 2.4" in str(error)


def test_a_stored_cuda_config_rebuilds_on_a_machine_without_a_gpu(monkeypatch):
    monkeypatch.setattr(devices, "cuda_device_count", lambda: 0)
    stored = {**BenchConfig(device="cpu").to_dict(), "device": "cuda:3", "memory_cap_gib": 70.0}
    config = BenchConfig.from_dict(stored)
    assert config.device == "cuda:3" and config.memory_cap_gib == 70.0
    assert _runnable_error(**stored).field == "device"  # it only fails when asked to run here


def test_light_modules_import_no_torch():
    # A fresh interpreter: importing the config, results, store, frontier and the CLI's
    # parser must not load torch (it costs seconds), and neither must `show`.
    code = ("import sys; import engine.config, engine.results, engine.store, engine.frontier, engine.predict, "
            "engine.cli; engine.cli.build_parser(); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stderr


def test_every_field_declares_label_help_and_a_valid_default():
    for field in CONFIG_FIELDS:
        assert field.spec.label and field.spec.help, field.name
    assert [f.name for f in CONFIG_FIELDS] == list(FIELD_NAMES)
    BenchConfig(**{f.name: f.default for f in CONFIG_FIELDS})


@pytest.mark.parametrize("field", [f for f in CONFIG_FIELDS if f.kind is not dict], ids=lambda f: f.name)
def test_text_parses_back_to_the_value_it_was_formatted_from(field):
    value = field.default if field.default is not None else {float: 1.5, str: "layer1.* layer2.0"}[field.kind]
    assert field.parse(field.format(value)) == value
    if field.nullable:
        assert field.parse(field.format(None)) is None


@pytest.mark.parametrize("name, text", [("batch", "9" * 30), ("batch", "two"), ("seed", "1.5"), ("timeout_s", "nan"),
                                        ("memory_cap_gib", "inf"), ("memory_cap_gib", "lots")])
def test_text_that_does_not_parse_names_the_field(name, text):
    with pytest.raises(ConfigError) as info:
        FIELDS_BY_NAME[name].parse(text)
    assert info.value.field == name and info.value.allowed


def test_from_dict_rejects_unknown_keys_and_round_trips():
    config = BenchConfig(device="cpu", batch=4, accum=3, overrides={"n_layers": 2})
    assert BenchConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ConfigError) as info:
        BenchConfig.from_dict({**config.to_dict(), "batchsize": 4})
    assert info.value.field == "batchsize"


def test_frozen_replace_validates_and_effective_batch():
    config = BenchConfig(device="cpu", batch=4, accum=3)
    assert config.effective_batch == 12
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.batch = 5
    with pytest.raises(ConfigError):
        config.replace(accum=0)
    assert config.replace(accum=2).effective_batch == 8


def test_auto_resolves_to_a_present_device():
    assert devices.resolve_device("auto") in ("cpu", "cuda", "mps")
    assert devices.resolve_device("cpu") == "cpu"
