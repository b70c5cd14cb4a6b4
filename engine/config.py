"""The benchmark configuration: one frozen, validated object per run."""
from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from typing import Any

from . import models

PRECISIONS = ("fp32", "fp16", "bf16")
CKPT_POLICIES = ("none", "full", "every-k", "selective")
OPTIMIZERS = ("adamw", "sgd")
DEVICE_PATTERN = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
GIB = 1024**3


class ConfigError(ValueError):
    """An invalid configuration value: names the field, the value and what is allowed."""

    def __init__(self, field_name: str, value: Any, allowed: str):
        self.field = field_name
        self.value = value
        self.allowed = allowed
        super().__init__(f"{field_name}: invalid value {value!r}; allowed: {allowed}")


def _require_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(name, value, f"an integer >= {minimum}")


def selective_checkpoint_available() -> bool:
    """Whether the installed torch has selective activation checkpointing (torch >= 2.4)."""
    import torch.utils.checkpoint as ckpt

    return hasattr(ckpt, "create_selective_checkpoint_contexts")


def cuda_device_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def mps_available() -> bool:
    import torch

    backend = getattr(torch.backends, "mps", None)
    return bool(backend and backend.is_available())


def resolve_device(device: str) -> str:
    """Turn ``auto`` into the best present device; other values pass through."""
    if device != "auto":
        return device
    if cuda_device_count() > 0:
        return "cuda"
    return "mps" if mps_available() else "cpu"


def device_capacity_bytes(device: str) -> int | None:
    """Total memory of a resolved device: GPU memory, or physical RAM for CPU; None if unknown."""
    if device.startswith("cuda"):
        import torch

        index = int(device.split(":")[1]) if ":" in device else 0
        return int(torch.cuda.get_device_properties(index).total_memory)
    if device == "cpu":
        try:
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError):
            return None
    return None


@dataclass(frozen=True)
class BenchConfig:
    """What to benchmark and how. Invalid values raise ``ConfigError`` on construction."""

    model: str = "gpt-tiny"
    overrides: dict = field(default_factory=dict)
    batch: int = 8
    accum: int = 1
    precision: str = "fp32"
    ckpt: str = "none"
    k: int = 2
    optimizer: str = "adamw"
    warmup: int = 3
    steps: int = 10
    device: str = "auto"
    memory_cap_gib: float | None = None
    timeout_s: float = 600.0
    seed: int = 0

    def __post_init__(self) -> None:
        self._check_model()
        _require_int("batch", self.batch, 1)
        _require_int("accum", self.accum, 1)
        if self.precision not in PRECISIONS:
            raise ConfigError("precision", self.precision, ", ".join(PRECISIONS))
        if self.ckpt not in CKPT_POLICIES:
            raise ConfigError("ckpt", self.ckpt, ", ".join(CKPT_POLICIES))
        _require_int("k", self.k, 1)
        if self.ckpt == "selective" and not selective_checkpoint_available():
            raise ConfigError("ckpt", self.ckpt, "none, full, every-k (this torch has no selective checkpointing; it needs torch >= 2.4)")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError("optimizer", self.optimizer, ", ".join(OPTIMIZERS))
        _require_int("warmup", self.warmup, 0)
        _require_int("steps", self.steps, 1)
        _require_int("seed", self.seed, 0)
        if isinstance(self.timeout_s, bool) or not isinstance(self.timeout_s, (int, float)) or not self.timeout_s > 0:
            raise ConfigError("timeout_s", self.timeout_s, "a number of seconds > 0")
        self._check_device()

    # -- model ------------------------------------------------------------------------
    def _check_model(self) -> None:
        if not isinstance(self.model, str) or not self.model:
            raise ConfigError("model", self.model, f"a preset ({', '.join(models.PRESETS)}) or module:function")
        if not isinstance(self.overrides, dict):
            raise ConfigError("overrides", self.overrides, "a mapping of dimension name to integer")
        if models.is_user_model(self.model):
            self._check_user_model()
            return
        if self.model not in models.PRESETS:
            raise ConfigError("model", self.model, f"a preset ({', '.join(models.PRESETS)}) or module:function")
        family, defaults = models.preset_dims(self.model)
        for key, value in self.overrides.items():
            if key not in defaults:
                raise ConfigError(f"overrides.{key}", value, f"a {family} dimension: {', '.join(defaults)}")
            _require_int(f"overrides.{key}", value, 1)
        _, dims = models.preset_dims(self.model, self.overrides)
        if family == "gpt" and dims["d_model"] % dims["n_heads"]:
            raise ConfigError("overrides.n_heads", dims["n_heads"], f"a divisor of d_model ({dims['d_model']})")

    def _check_user_model(self) -> None:
        import torch

        module_name, _, func_name = self.model.partition(":")
        if not module_name or not func_name:
            raise ConfigError("model", self.model, "module:function with both parts, e.g. mypkg.models:build")
        if self.overrides:
            raise ConfigError("overrides", self.overrides, "no overrides for a module:function model (configure it in your build function)")
        try:
            builder = models.load_user_builder(self.model)
        except Exception as exc:  # any import-time failure in user code is a config error
            raise ConfigError("model", self.model, f"an importable module:function ({type(exc).__name__}: {exc})") from None
        # Built on the meta device the check allocates nothing, whatever the model's size.
        try:
            with torch.device("meta"):
                built = builder()
        except Exception:
            try:
                built = builder()
            except Exception as exc:
                raise ConfigError("model", self.model, f"a builder that runs ({type(exc).__name__}: {exc})") from None
        try:
            models.check_contract(built, self.model)
        except TypeError as exc:
            raise ConfigError("model", self.model, f"a function returning (model, make_batch): {exc}") from None

    # -- device -----------------------------------------------------------------------
    def _check_device(self) -> None:
        if not isinstance(self.device, str) or not DEVICE_PATTERN.match(self.device):
            raise ConfigError("device", self.device, "auto, cpu, cuda, cuda:N, mps")
        if self.device.startswith("cuda"):
            count = cuda_device_count()
            if count == 0:
                raise ConfigError("device", self.device, "auto, cpu (no CUDA GPU is present)")
            index = int(self.device.split(":")[1]) if ":" in self.device else 0
            if index >= count:
                raise ConfigError("device", self.device, f"cuda:0 .. cuda:{count - 1}")
        if self.device == "mps" and not mps_available():
            raise ConfigError("device", self.device, "auto, cpu, cuda (MPS is not available)")
        cap = self.memory_cap_gib
        if cap is None:
            return
        if isinstance(cap, bool) or not isinstance(cap, (int, float)) or not cap > 0:
            raise ConfigError("memory_cap_gib", cap, "a number of GiB > 0, or none")
        capacity = device_capacity_bytes(resolve_device(self.device))
        if capacity is not None and cap * GIB > capacity:
            raise ConfigError("memory_cap_gib", cap, f"at most the device's {capacity / GIB:.1f} GiB")

    # -- derived values and (de)serialisation -------------------------------------------
    @property
    def effective_batch(self) -> int:
        """Samples per optimizer step: micro-batch × accumulation steps."""
        return self.batch * self.accum

    def to_dict(self) -> dict:
        """Plain JSON-ready dict of every field."""
        data = dataclasses.asdict(self)
        data["overrides"] = dict(self.overrides)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "BenchConfig":
        """Build from a dict (e.g. a stored result's config); unknown keys are an error."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(unknown[0], data[unknown[0]], f"a BenchConfig field: {', '.join(sorted(names))}")
        return cls(**data)

    def replace(self, **changes: Any) -> "BenchConfig":
        """A validated copy with some fields changed."""
        return dataclasses.replace(self, **changes)


FIELD_NAMES = tuple(f.name for f in dataclasses.fields(BenchConfig))
