"""The benchmark configuration: one frozen, validated object per run.

Each field is declared once, below, with its type (``Literal`` for choices), default,
allowed range, label and help (``setting(...)``). ``CONFIG_FIELDS`` turns those
declarations into one ``ConfigField`` per field, from which the CLI flags, the dashboard's
form, the URL query parameters and the sweep axes are generated: adding a field is one edit.

``BenchConfig.__post_init__`` checks values only, so a config stored on a GPU machine
rebuilds anywhere and importing this module never loads torch. ``check_runnable(config)``
holds the checks that need this machine (device present, cap within its memory, user model
importable and honouring the contract); front ends call it just before running.
"""
from __future__ import annotations

import dataclasses
import math
import re
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

from . import devices, presets

GIB = 1024**3


def gib_words(num_bytes: float) -> str:
    """Bytes as GiB for people: three significant digits, never an exponent ("23.5 GiB",
    "0.125 GiB", "2,000 GiB")."""
    gib = num_bytes / GIB
    return f"{gib:,.0f} GiB" if gib >= 1000 else f"{gib:.3g} GiB"

Precision = Literal["fp32", "fp16", "bf16"]
CkptPolicy = Literal["none", "full", "every-k", "selective", "offload"]
Optimizer = Literal["adamw", "sgd"]
CompileMode = Literal["none", "default", "max-autotune"]
PRECISIONS: tuple[str, ...] = typing.get_args(Precision)
CKPT_POLICIES: tuple[str, ...] = typing.get_args(CkptPolicy)
OPTIMIZERS: tuple[str, ...] = typing.get_args(Optimizer)
DEVICE_PATTERN = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
# Integers beyond int64 cannot be stored in SQLite or handed to torch.
_INT_LIMIT = 2**63 - 1


class ConfigError(ValueError):
    """An invalid configuration value: names the field, the value and what is allowed."""

    def __init__(self, field_name: str, value: Any, allowed: str):
        self.field = field_name
        self.value = value
        self.allowed = allowed
        super().__init__(f"{field_name}: invalid value {_shown(value)}; allowed: {allowed}")


def _shown(value: Any) -> str:
    """``repr`` of a value, cut short: a hostile file may hold a 400-digit number."""
    text = repr(value) if not isinstance(value, int) or abs(value) < 10**30 else f"<an integer of {len(str(abs(value)))} digits>"
    return text if len(text) <= 200 else text[:197] + "..."


@dataclass(frozen=True)
class FieldSpec:
    """What a config field allows and how front ends present it (dataclass field metadata)."""

    label: str
    help: str
    flag: str | None = None  # the CLI flag; default --<name with dashes>
    minimum: float | None = None
    minimum_exclusive: bool = False
    maximum: float | None = None
    unit: str = ""  # words after a number in messages ("seconds", "GiB")
    step: float | None = None  # a form's increment
    sweep: str = ""  # values a newly picked sweep axis starts with (comma list); empty: not a sweep axis
    choice_words: dict[str, str] = field(default_factory=dict)  # choice -> how a form shows it
    applies_when: tuple[str, tuple] | None = None  # (field, values) under which this field matters
    check: Callable[["BenchConfig"], None] | None = None  # extra value check of the whole config
    allowed: str = ""  # what a free-text field allows, in words


def setting(default: Any = dataclasses.MISSING, default_factory: Any = dataclasses.MISSING, **spec) -> Any:
    """A BenchConfig field with its ``FieldSpec``."""
    kwargs = {"default": default} if default_factory is dataclasses.MISSING else {"default_factory": default_factory}
    return field(metadata={"spec": FieldSpec(**spec)}, **kwargs)


_MODEL_ALLOWED = f"a preset ({', '.join(presets.PRESETS)}) or module:function"
_DEVICE_ALLOWED = "auto, cpu, cuda, cuda:N, mps"


def _check_model(config: "BenchConfig") -> None:
    """A preset with valid dimension overrides, or a user ``module:function`` without overrides."""
    model, overrides = config.model, config.overrides
    allowed = _MODEL_ALLOWED
    if not isinstance(model, str) or not model or len(model) > 200:
        raise ConfigError("model", model, allowed)
    if not isinstance(overrides, dict):
        raise ConfigError("overrides", overrides, "a mapping of dimension name to integer")
    if presets.is_user_model(model):
        module_name, _, func_name = model.partition(":")
        if not module_name or not func_name:
            raise ConfigError("model", model, "module:function with both parts, e.g. mypkg.models:build")
        if overrides:
            raise ConfigError("overrides", overrides, "no overrides for a module:function model (configure it in your build function)")
        return
    if model not in presets.PRESETS:
        raise ConfigError("model", model, allowed)
    family, defaults = presets.preset_dims(model)
    for key, value in overrides.items():
        if key not in defaults:
            raise ConfigError(f"overrides.{key}", value, f"a {family} dimension: {', '.join(defaults)}")
        _check_int(f"overrides.{key}", value, 1, _INT_LIMIT)
    _, dims = presets.preset_dims(model, overrides)
    if family == "gpt" and dims["d_model"] % dims["n_heads"]:
        raise ConfigError("overrides.n_heads", dims["n_heads"], f"a divisor of d_model ({dims['d_model']})")


def _check_device(config: "BenchConfig") -> None:
    if not isinstance(config.device, str) or not DEVICE_PATTERN.match(config.device):
        raise ConfigError("device", config.device, _DEVICE_ALLOWED)


def minimum_warmup(device: str, precision: str, compile: str = "none") -> int:
    """Warm-up steps a run on ``device`` needs before timing: on CUDA the first step loads
    kernels lazily and creates cuBLAS workspaces (1), and fp16's GradScaler skips its first
    steps while it calibrates the loss scale (2). Under torch.compile (any device) the first
    step compiles forward and backward and the second shows whether the first optimizer step
    made a guard fail and compile again (2), so no compilation lands in a timed step."""
    compiled = 2 if compile != "none" else 0
    if not device.startswith("cuda"):
        return compiled
    return max(compiled, 2 if precision == "fp16" else 1)


def _check_warmup(config: "BenchConfig") -> None:
    if not isinstance(config.device, str):
        return
    need = minimum_warmup(config.device, config.precision, config.compile)
    if config.warmup >= need:
        return
    cuda = config.device.startswith("cuda")
    fp16 = cuda and config.precision == "fp16"
    where = [words for words, applies in (("on CUDA", cuda), ("with fp16", fp16),
                                          (f"with compile {config.compile}", config.compile != "none")) if applies]
    reasons = [words for words, applies in (
        ("the first steps load kernels and create cuBLAS workspaces", cuda),
        ("GradScaler calibrates its loss scale", fp16),
        ("torch.compile compiles in the first step and may recompile in the second", config.compile != "none"),
    ) if applies]
    raise ConfigError("warmup", config.warmup, f"an integer >= {need} {' '.join(where)} ({'; '.join(reasons)})")


_BLOCKS_ALLOWED = "module paths or fnmatch patterns separated by spaces (letters, digits, _ . * ? [ ] -), or none"
_BLOCKS_PATTERN = re.compile(r"^[A-Za-z0-9_.*?\[\]\- ]{1,500}$")


def _check_blocks(config: "BenchConfig") -> None:
    blocks = config.blocks
    if blocks is not None and (not isinstance(blocks, str) or not _BLOCKS_PATTERN.match(blocks) or not blocks.split()):
        raise ConfigError("blocks", blocks, _BLOCKS_ALLOWED)


def _check_int(name: str, value: Any, minimum: float | None, maximum: float | None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or (minimum is not None and value < minimum) \
            or (maximum is not None and value > maximum):
        bounds = f">= {minimum:g}" if maximum is None or maximum >= _INT_LIMIT else f"from {minimum:g} to {maximum:g}"
        raise ConfigError(name, value, f"an integer {bounds}")


@dataclass(frozen=True)
class BenchConfig:
    """What to benchmark and how. Invalid values raise ``ConfigError`` on construction."""

    model: str = setting("gpt-tiny", label="Model", help="the model to train", allowed=_MODEL_ALLOWED, check=_check_model)
    overrides: dict = setting(default_factory=dict, label="Model dimensions", flag="--set",
                              help="model dimension override, e.g. seq_len=256 (repeatable)")
    batch: int = setting(8, label="Micro-batch size", help="micro-batch size", minimum=1, sweep="1,2,4,8,16")
    accum: int = setting(1, label="Accumulation steps", help="gradient-accumulation steps", minimum=1, sweep="1,2,4")
    precision: Precision = setting("fp32", label="Precision", help="compute precision (fp16 always with GradScaler)",
                                   sweep="fp32,bf16", choice_words={"fp16": "fp16 (GradScaler)"})
    ckpt: CkptPolicy = setting("none", label="Activation checkpointing", help="activation checkpointing policy",
                               sweep="none,full")
    k: int = setting(2, label="k (checkpoint every k-th block)", help="for --ckpt every-k: checkpoint every k-th block",
                     minimum=1, sweep="2,4", applies_when=("ckpt", ("every-k",)))
    blocks: str | None = setting(None, label="Blocks to checkpoint",
                                 help="the blocks checkpointing wraps: module paths or patterns, space-separated "
                                      "(e.g. 'layer*.*'); empty: found automatically",
                                 allowed=_BLOCKS_ALLOWED, check=_check_blocks,
                                 applies_when=("ckpt", ("full", "every-k", "selective")))
    compile: CompileMode = setting("none", label="torch.compile",
                                   help="torch.compile the model (mode); compile time is reported apart (compile_s), "
                                        "never inside step time",
                                   sweep="none,default")
    optimizer: Optimizer = setting("adamw", label="Optimizer", help="optimizer", sweep="adamw,sgd")
    warmup: int = setting(3, label="Warm-up steps (not measured)", help="warm-up optimizer steps (not measured)",
                          minimum=0, check=_check_warmup)
    steps: int = setting(10, label="Measured steps", help="measured optimizer steps", minimum=1)
    device: str = setting("auto", label="Device", help="device to run on", allowed=_DEVICE_ALLOWED, check=_check_device)
    memory_cap_gib: float | None = setting(None, label="Memory cap (GiB)", unit="GiB", minimum=0, minimum_exclusive=True,
                                           step=0.5, help="cap memory to emulate a smaller device (GiB)")
    timeout_s: float = setting(600.0, label="Timeout (s)", flag="--timeout", unit="seconds", minimum=0,
                               minimum_exclusive=True, step=30.0, help="wall-clock limit for the run (seconds)")
    seed: int = setting(0, label="Seed", help="random seed", minimum=0)

    def __post_init__(self) -> None:
        for config_field in CONFIG_FIELDS:
            config_field.check(self)

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
        if not isinstance(data, dict):
            raise ConfigError("config", data, "an object of BenchConfig fields")
        unknown = sorted(set(data) - set(FIELD_NAMES))
        if unknown:
            raise ConfigError(unknown[0], data[unknown[0]], f"a BenchConfig field: {', '.join(FIELD_NAMES)}")
        return cls(**data)

    def replace(self, **changes: Any) -> "BenchConfig":
        """A validated copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    @property
    def model_label(self) -> str:
        """The model with its overrides, e.g. ``gpt-tiny (n_layers=2, seq_len=32)``."""
        if not self.overrides:
            return self.model
        return f"{self.model} ({', '.join(f'{k}={v}' for k, v in sorted(self.overrides.items()))})"

    def describe(self, with_model: bool = True) -> str:
        """The configuration in words: ``gpt-tiny, batch 8 × accum 4, bf16, checkpointing every
        2nd block`` (without the model when ``with_model`` is False)."""
        parts = [self.model_label] if with_model else []
        parts += [f"batch {self.batch} × accum {self.accum}", self.precision, ckpt_words(self.ckpt, self.k)]
        if self.compile != "none":
            parts.append(f"compiled ({self.compile})")
        if self.optimizer != "adamw":
            parts.append(self.optimizer)
        return ", ".join(parts)


def ckpt_words(ckpt: str, k: int) -> str:
    """A checkpointing policy in words ("checkpointing every 2nd block")."""
    if ckpt == "every-k":
        ordinal = {1: "", 2: "2nd ", 3: "3rd "}.get(k, f"{k}th ")
        return f"checkpointing every {ordinal}block"
    return {"none": "no checkpointing", "full": "full checkpointing", "selective": "selective checkpointing",
            "offload": "activations offloaded to host memory"}.get(ckpt, ckpt)


def memory_limit_bytes(memory_cap_gib: float | None, capacity_bytes: float | None) -> float | None:
    """The memory a run may use: its memory cap, else its device's capacity (None if unknown)."""
    return memory_cap_gib * GIB if memory_cap_gib is not None else capacity_bytes


# --------------------------------------------------------------------------- field views
@dataclass(frozen=True)
class ConfigField:
    """One BenchConfig field as front ends see it: its name, type, default and ``FieldSpec``.

    ``kind`` is ``int``, ``float``, ``str`` or ``dict``; ``choices`` the allowed values of a
    ``Literal`` field; ``nullable`` whether None (written "none") is allowed.
    """

    name: str
    kind: type
    nullable: bool
    choices: tuple[str, ...] | None
    default: Any
    spec: FieldSpec

    @property
    def flag(self) -> str:
        """The CLI flag that sets this field."""
        return self.spec.flag or "--" + self.name.replace("_", "-")

    def allowed(self) -> str:
        """What this field allows, in words (the tail of its ConfigError)."""
        if self.choices:
            return ", ".join(self.choices)
        if self.kind is int:
            low, high = self.spec.minimum, self.spec.maximum
            return f"an integer >= {low:g}" if high is None else f"an integer from {low:g} to {high:g}"
        if self.kind is float:
            unit = f" of {self.spec.unit}" if self.spec.unit else ""
            low = f" {'>' if self.spec.minimum_exclusive else '>='} {self.spec.minimum:g}" if self.spec.minimum is not None else ""
            high = f" and <= {self.spec.maximum:g}" if self.spec.maximum is not None else ""
            return f"a number{unit}{low}{high}" + (", or none" if self.nullable else "")
        return self.spec.allowed

    def check(self, config: BenchConfig) -> None:
        """Raise ConfigError if this field's value in ``config`` is not allowed (values only)."""
        value = getattr(config, self.name)
        if value is None and self.nullable:
            return
        if self.choices is not None:
            if not isinstance(value, str) or value not in self.choices:
                raise ConfigError(self.name, value, self.allowed())
        elif self.kind is int:
            _check_int(self.name, value, self.spec.minimum, self.spec.maximum if self.spec.maximum is not None else _INT_LIMIT)
        elif self.kind is str and not isinstance(value, str):
            raise ConfigError(self.name, value, self.allowed())
        elif self.kind is float:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or not self._in_range(value):
                raise ConfigError(self.name, value, self.allowed())
        if self.spec.check is not None:
            self.spec.check(config)

    def _in_range(self, value: float) -> bool:
        low, high = self.spec.minimum, self.spec.maximum
        if low is not None and (value < low or (self.spec.minimum_exclusive and value == low)):
            return False
        return high is None or value <= high

    def parse(self, text: str) -> Any:
        """The typed value of ``text`` (a CLI argument or URL parameter); ConfigError if it does
        not parse. Range checks are BenchConfig's."""
        text = text.strip()
        if self.nullable and text.lower() in ("none", ""):
            return None
        if self.kind is int:
            # Bounded before int(): a 30-digit string would otherwise reach torch as a size.
            if not re.fullmatch(r"[+-]?\d{1,19}", text):
                raise ConfigError(self.name, text, self.allowed())
            return int(text)
        if self.kind is float:
            try:
                value = float(text)
            except ValueError:
                raise ConfigError(self.name, text, self.allowed()) from None
            if not math.isfinite(value):
                raise ConfigError(self.name, text, self.allowed())
            return value
        return text

    def format(self, value: Any) -> str:
        """``value`` as text that ``parse`` reads back."""
        if value is None:
            return "none"
        if self.kind is float:
            return f"{value:g}"
        return str(value)

    def applies(self, config: BenchConfig | dict) -> bool:
        """Whether this field matters for ``config`` (``k`` only with every-k checkpointing)."""
        if self.spec.applies_when is None:
            return True
        other, values = self.spec.applies_when
        current = config.get(other) if isinstance(config, dict) else getattr(config, other)
        return current in values


def _config_fields() -> tuple[ConfigField, ...]:
    hints = typing.get_type_hints(BenchConfig)
    out = []
    for f in dataclasses.fields(BenchConfig):
        hint = hints[f.name]
        args = typing.get_args(hint)
        nullable = type(None) in args
        base = next((a for a in args if a is not type(None)), hint) if nullable else hint
        choices = typing.get_args(base) if typing.get_origin(base) is Literal else None
        kind = str if choices else base
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        out.append(ConfigField(f.name, kind, nullable, choices, default, f.metadata["spec"]))
    return tuple(out)


CONFIG_FIELDS: tuple[ConfigField, ...] = _config_fields()
FIELD_NAMES: tuple[str, ...] = tuple(f.name for f in CONFIG_FIELDS)
FIELDS_BY_NAME: dict[str, ConfigField] = {f.name: f for f in CONFIG_FIELDS}
# The fields set by a plain value (every one but the model dimensions, set by --set KEY=VALUE).
SCALAR_FIELDS: tuple[ConfigField, ...] = tuple(f for f in CONFIG_FIELDS if f.kind is not dict)
SWEEP_FIELDS: tuple[str, ...] = tuple(f.name for f in CONFIG_FIELDS if f.spec.sweep)


def sweep_values(field: ConfigField) -> list:
    """The typed values a newly picked sweep axis starts with (from its declaration)."""
    return [field.parse(part) for part in field.spec.sweep.split(",")]


def parse_override(key: str, text: str) -> int:
    """The value of one model dimension from text (``--set seq_len=256``, a link's ``seq_len``)."""
    name = f"overrides.{key}"
    if not re.fullmatch(r"\s*[+-]?\d{1,19}\s*", text):
        raise ConfigError(name, text, "an integer >= 1")
    return int(text)


# --------------------------------------------------------------------------- this machine
def selective_checkpoint_available() -> bool:
    """Whether the installed torch has selective activation checkpointing (torch >= 2.4)."""
    import torch.utils.checkpoint as ckpt

    return hasattr(ckpt, "create_selective_checkpoint_contexts")


def check_runnable(config: BenchConfig, *, check_memory: bool = True) -> None:
    """The checks that need this machine, called just before a run: the config is within
    this server's limits (``engine.limits``), the device is present, a memory cap fits it,
    the torch has the checkpointing policy, a user model imports and honours the contract
    (built on the meta device, so it allocates nothing), and, unless ``check_memory`` is
    False (the CLI's ``--force``; the batch finder, whose trials must meet their real OOM),
    its analytic peak memory is not several times what the device has.

    Raises ConfigError naming the field, as value checks do. Limits apply here, where a run
    is requested, never to reading stored results.
    """
    from . import limits  # imports this module: loaded on first use

    limits.check_limits(config)
    _check_device_present(config.device)
    resolved = devices.resolve_device(config.device)
    if config.device == "auto" and config.warmup < minimum_warmup(resolved, config.precision, config.compile):
        _check_warmup(config.replace(device=resolved))  # "auto" is a GPU here: its rule applies
    if config.ckpt == "selective" and not selective_checkpoint_available():
        raise ConfigError("ckpt", config.ckpt, "none, full, every-k, offload (this torch has no selective checkpointing; it needs torch >= 2.4)")
    if config.memory_cap_gib is not None:
        capacity = devices.device_capacity_bytes(devices.resolve_device(config.device))
        if capacity is not None and config.memory_cap_gib * GIB > capacity:
            raise ConfigError("memory_cap_gib", config.memory_cap_gib, f"at most the device's {capacity / GIB:.1f} GiB")
    if presets.is_user_model(config.model):
        _check_user_model(config.model)
    if check_memory:
        limits.check_memory(config)


def device_memory_limit(config: BenchConfig) -> float | None:
    """The memory ``config`` may use on this machine: its cap, else its device's capacity."""
    return memory_limit_bytes(config.memory_cap_gib, devices.device_capacity_bytes(devices.resolve_device(config.device)))


def _check_device_present(device: str) -> None:
    if device.startswith("cuda"):
        count = devices.cuda_device_count()
        if count == 0:
            raise ConfigError("device", device, "auto, cpu (no CUDA GPU is present)")
        index = int(device.split(":")[1]) if ":" in device else 0
        if index >= count:
            raise ConfigError("device", device, f"cuda:0 .. cuda:{count - 1}")
    if device == "mps" and not devices.mps_available():
        raise ConfigError("device", device, "auto, cpu, cuda (MPS is not available)")


def _check_user_model(spec: str) -> None:
    import torch

    from . import models

    try:
        builder = models.load_user_builder(spec)
    except (Exception, SystemExit) as exc:  # any import-time failure in user code is a config error
        raise ConfigError("model", spec, f"an importable module:function ({type(exc).__name__}: {exc})") from None
    # SystemExit too: a builder that calls sys.exit() must not end the caller.
    try:
        with torch.device("meta"):
            built = builder()
    except (Exception, SystemExit):
        try:
            built = builder()
        except (Exception, SystemExit) as exc:
            raise ConfigError("model", spec, f"a builder that runs ({type(exc).__name__}: {exc})") from None
    try:
        models.check_contract(built, spec)
    except TypeError as exc:
        raise ConfigError("model", spec, f"a function returning (model, make_batch): {exc}") from None
