"""BenchConfig: every invalid field raises ConfigError naming the field, value and what is allowed."""
import dataclasses

import pytest

from engine import BenchConfig, ConfigError
from engine import config as config_module
from engine.config import GIB, device_capacity_bytes

CPU = {"device": "cpu"}
HELPERS = "tests.helper_models"


def _error(**fields) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        BenchConfig(**fields)
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
    assert error.value == value
    assert error.allowed
    assert str(error).startswith(f"{field}: invalid value {value!r}; allowed: ")


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
    error = _error(model=model, device="cpu", **fields)
    assert error.field in ("model", "overrides")
    assert phrase in str(error)


def test_user_model_that_honours_the_contract_is_accepted():
    config = BenchConfig(model=f"{HELPERS}:sleepy_backward", device="cpu")
    assert config.model.endswith(":sleepy_backward")


def test_memory_cap_larger_than_the_device():
    capacity = device_capacity_bytes("cpu")
    error = _error(device="cpu", memory_cap_gib=capacity / GIB * 2)
    assert error.field == "memory_cap_gib" and "at most the device's" in str(error)
    assert BenchConfig(device="cpu", memory_cap_gib=0.5).memory_cap_gib == 0.5


def test_cuda_without_a_gpu(monkeypatch):
    # Pretend no GPU is present, so the check runs the same on GPU machines.
    monkeypatch.setattr(config_module, "cuda_device_count", lambda: 0)
    for device in ("cuda", "cuda:0"):
        error = _error(device=device)
        assert error.field == "device" and "no CUDA GPU is present" in str(error)


def test_cuda_index_past_the_last_gpu(monkeypatch):
    monkeypatch.setattr(config_module, "cuda_device_count", lambda: 2)
    error = _error(device="cuda:2")
    assert error.field == "device" and "cuda:0 .. cuda:1" in error.allowed


def test_mps_when_unavailable(monkeypatch):
    monkeypatch.setattr(config_module, "mps_available", lambda: False)
    assert "MPS is not available" in str(_error(device="mps"))


def test_selective_checkpointing_needs_a_torch_that_has_it(monkeypatch):
    assert BenchConfig(device="cpu", ckpt="selective").ckpt == "selective"  # torch >= 2.4 here
    monkeypatch.setattr(config_module, "selective_checkpoint_available", lambda: False)
    error = _error(device="cpu", ckpt="selective")
    assert error.field == "ckpt" and "torch >= 2.4" in str(error)


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
    assert config_module.resolve_device("auto") in ("cpu", "cuda", "mps")
    assert config_module.resolve_device("cpu") == "cpu"
