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

from . import devices, hf_table, presets

GIB = 1024**3


def gib_words(num_bytes: float) -> str:
    """Bytes as GiB for people: three significant digits, never an exponent ("23.5 GiB",
    "0.125 GiB", "2,000 GiB")."""
    gib = num_bytes / GIB
    return f"{gib:,.0f} GiB" if gib >= 1000 else f"{gib:.3g} GiB"

Precision = Literal["fp32", "fp16", "bf16"]
CkptPolicy = Literal["none", "full", "every-k", "selective", "offload"]
Optimizer = Literal["adamw", "sgd", "adafactor"]
OptimizerImpl = Literal["auto", "fused", "foreach", "loop"]
Attention = Literal["auto", "math", "flash", "efficient", "cudnn"]
Parallel = Literal["none", "ddp", "fsdp"]
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
    # How a value other than the default reads in a configuration's description and a run's
    # label ("{} attention"); empty: the field is not described there.
    words: str = ""
    # The form section a rarely changed field sits in (a collapsed expander, opened when a
    # value in it differs from its default); empty: always shown.
    group: str = ""


def setting(default: Any = dataclasses.MISSING, default_factory: Any = dataclasses.MISSING, **spec) -> Any:
    """A BenchConfig field with its ``FieldSpec``."""
    kwargs = {"default": default} if default_factory is dataclasses.MISSING else {"default_factory": default_factory}
    return field(metadata={"spec": FieldSpec(**spec)}, **kwargs)


_MODEL_ALLOWED = (f"a preset ({', '.join(presets.PRESETS)}), a Hugging Face architecture "
                  f"({', '.join(hf_table.hf_names())}) or module:function")
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
    if hf_table.is_hf(model) and model not in presets.MODELS:
        raise ConfigError("model", model, f"a Hugging Face architecture of the table: {', '.join(hf_table.hf_names())}")
    if model not in presets.MODELS:
        raise ConfigError("model", model, allowed)
    family, defaults = presets.preset_dims(model)
    for key, value in overrides.items():
        if key not in defaults:
            raise ConfigError(f"overrides.{key}", value, f"a dimension of {model}: {', '.join(defaults)}")
        _check_int(f"overrides.{key}", value, 1, _INT_LIMIT)
    _, dims = presets.preset_dims(model, overrides)
    if family == "gpt" and dims["d_model"] % dims["n_heads"]:
        raise ConfigError("overrides.n_heads", dims["n_heads"], f"a divisor of d_model ({dims['d_model']})")
    problem = hf_table.dimension_problem(family, dims) if hf_table.is_hf(model) else None
    if problem:
        raise ConfigError(f"overrides.{problem[0]}", dims[problem[0]], problem[1])


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


def _check_parallel(config: "BenchConfig") -> None:
    """Several ranks need a data-parallel wrapper; one rank may still have one (it measures
    the wrapper's own cost: DDP's bucketing hooks, FSDP's all-gathers of a group of one)."""
    if config.parallel == "none" and isinstance(config.nproc, int) and config.nproc > 1:
        raise ConfigError("parallel", config.parallel,
                          f"ddp or fsdp with nproc {config.nproc} (several ranks need a data-parallel wrapper), "
                          "or nproc 1")
    if config.parallel == "fsdp" and config.precision == "fp16":
        # GradScaler would find inf/NaN in one rank's shard only, and that rank alone
        # would skip the step.
        raise ConfigError("precision", config.precision, "fp32 or bf16 with FSDP (fp16's GradScaler checks each "
                          "rank's gradient shard on its own)")


_BLOCKS_ALLOWED = "module paths or fnmatch patterns separated by spaces (letters, digits, _ . * ? [ ] -), or none"
_BLOCKS_PATTERN = re.compile(r"^[A-Za-z0-9_.*?\[\]\- ]{1,500}$")


def _check_blocks(config: "BenchConfig") -> None:
    blocks = config.blocks
    if blocks is not None and (not isinstance(blocks, str) or not _BLOCKS_PATTERN.match(blocks) or not blocks.split()):
        raise ConfigError("blocks", blocks, _BLOCKS_ALLOWED)


# ------------------------------------------------------------------ optimizer, attention, allocator
# The implementations torch.optim has per optimizer: Adafactor takes only ``foreach`` (it has
# no fused kernel). "auto" is in every list; ``optimizer_impl_for`` resolves it.
OPTIMIZER_IMPLS: dict[str, tuple[str, ...]] = {
    "adamw": ("auto", "fused", "foreach", "loop"),
    "sgd": ("auto", "fused", "foreach", "loop"),
    "adafactor": ("auto", "foreach", "loop"),
}


def optimizer_impl_for(optimizer: str, impl: str, device_type: str) -> str:
    """The implementation a run of ``optimizer`` uses on ``device_type``: ``impl`` itself, and
    for "auto" the fused kernel on CUDA where the optimizer has one (it also takes
    GradScaler's inf check on the device, so the fp16 step needs no host synchronisation),
    else foreach (multi-tensor kernels), the choice the engine has always made."""
    if impl != "auto":
        return impl
    return "fused" if device_type == "cuda" and "fused" in OPTIMIZER_IMPLS[optimizer] else "foreach"


def _check_optimizer_impl(config: "BenchConfig") -> None:
    allowed = OPTIMIZER_IMPLS[config.optimizer]
    if config.optimizer_impl not in allowed:
        raise ConfigError("optimizer_impl", config.optimizer_impl,
                          f"{', '.join(allowed)} with {config.optimizer} (torch has no {config.optimizer_impl} "
                          f"{config.optimizer})")


@dataclass(frozen=True)
class AttentionBackend:
    """Where one SDPA backend runs (PyTorch's sdp_utils.cpp and sdp_utils_cpp.cpp): device
    types, the least CUDA compute capability, and whether on CUDA it takes fp16/bf16 only."""

    device_types: tuple[str, ...]
    min_capability: tuple[int, int] | None = None
    half_only_on_cuda: bool = False


# On the CPU, the math kernel and a flash-attention kernel of its own (fp32 included); on
# CUDA, memory-efficient from sm50, flash and cuDNN from sm80 and for fp16/bf16 only; on MPS
# its math kernel.
ATTENTION_BACKENDS: dict[str, AttentionBackend] = {
    "math": AttentionBackend(("cpu", "cuda", "mps")),
    "flash": AttentionBackend(("cpu", "cuda"), (8, 0), half_only_on_cuda=True),
    "efficient": AttentionBackend(("cuda",), (5, 0)),
    "cudnn": AttentionBackend(("cuda",), (8, 0), half_only_on_cuda=True),
}


def _backend_problem(name: str, device_type: str, precision: str, capability: tuple[int, int] | None) -> str | None:
    """Why SDPA backend ``name`` cannot run there, or None (also when the capability is unknown)."""
    backend = ATTENTION_BACKENDS.get(name)
    if backend is None:  # "auto": torch picks what runs
        return None
    if device_type not in backend.device_types:
        return f"{name} needs {' or '.join(backend.device_types)}"
    if device_type != "cuda":
        return None
    if backend.half_only_on_cuda and precision == "fp32":
        return f"{name} on CUDA needs fp16 or bf16"
    if backend.min_capability and capability is not None and tuple(capability) < backend.min_capability:
        need = ".".join(map(str, backend.min_capability))
        return f"{name} needs compute capability >= {need}"
    return None


def check_attention_backend(attention: str, device_type: str, precision: str, device_words: str,
                            capability: tuple[int, int] | None = None) -> None:
    """Raise ConfigError naming the device when SDPA backend ``attention`` cannot run on it
    (``device_words``: the device in words, e.g. "cuda (Tesla V100, compute capability 7.0)")."""
    problem = _backend_problem(attention, device_type, precision, capability)
    if problem is not None:
        allowed = [name for name in typing.get_args(Attention)
                   if _backend_problem(name, device_type, precision, capability) is None]
        raise ConfigError("attention", attention, f"{', '.join(allowed)} on {device_words} ({problem})")


def _check_attention(config: "BenchConfig") -> None:
    if config.attention == "auto":
        return
    if presets.has_attention(config.model) is False:
        with_attention = [name for name in presets.PRESETS if presets.has_attention(name)]
        raise ConfigError("attention", config.attention,
                          f"auto (attention applies only to models with attention: {', '.join(with_attention)} "
                          f"or your own module:function; {config.model} has none)")
    if isinstance(config.device, str) and config.device != "auto" and DEVICE_PATTERN.match(config.device):
        device_type = config.device.split(":")[0]
        check_attention_backend(config.attention, device_type, config.precision, device_type)


def _alloc_flag(value: str) -> bool:
    return value in ("True", "False")


def _power_of_two(value: str) -> bool:
    return value.isdigit() and int(value) > 0 and int(value) & (int(value) - 1) == 0


# The CUDA caching allocator's settings a config may set, in PYTORCH_CUDA_ALLOC_CONF's syntax
# (key:value[,key:value]): key -> (value check, the values in words), as c10's allocator
# config parses them.
ALLOC_CONF_KEYS: dict[str, tuple[Callable[[str], bool], str]] = {
    "expandable_segments": (_alloc_flag, "True or False"),
    "max_split_size_mb": (lambda v: v.isdigit() and 20 <= int(v) <= 10**9, "an integer of MiB >= 20"),
    "garbage_collection_threshold": (lambda v: bool(re.fullmatch(r"0?\.\d{1,6}", v)) and 0 < float(v) < 1,
                                     "a fraction between 0 and 1"),
    "roundup_power2_divisions": (_power_of_two, "a power of 2"),
    "backend": (lambda v: v in ("native", "cudaMallocAsync"), "native or cudaMallocAsync"),
}
_ALLOC_CONF_ALLOWED = ("key:value[,key:value] with keys " + ", ".join(ALLOC_CONF_KEYS)
                       + " (e.g. expandable_segments:True), or none")


def _check_alloc_conf_text(text: Any) -> None:
    """ConfigError naming ``alloc_conf`` unless ``text`` is key:value pairs the allow-list holds,
    each key once."""
    if not isinstance(text, str) or not text.strip() or len(text) > 200:
        raise ConfigError("alloc_conf", text, _ALLOC_CONF_ALLOWED)
    seen: set[str] = set()
    for item in text.split(","):
        key, sep, value = (part.strip() for part in item.partition(":"))
        if key not in ALLOC_CONF_KEYS or not sep or key in seen:
            raise ConfigError("alloc_conf", text, _ALLOC_CONF_ALLOWED + (f"; {key} twice" if key in seen else ""))
        valid, words = ALLOC_CONF_KEYS[key]
        if not valid(value):
            raise ConfigError("alloc_conf", text, f"{key}: {words}")
        seen.add(key)


def _check_alloc_conf(config: "BenchConfig") -> None:
    if config.alloc_conf is None:
        return
    _check_alloc_conf_text(config.alloc_conf)
    if isinstance(config.device, str) and config.device in ("cpu", "mps"):
        _no_cuda_allocator(config.alloc_conf, config.device)


def _no_cuda_allocator(alloc_conf: str, device: str) -> None:
    raise ConfigError("alloc_conf", alloc_conf,
                      f"none on {device} (the settings configure the CUDA caching allocator, which {device} does not use)")


def _check_int(name: str, value: Any, minimum: float | None, maximum: float | None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or (minimum is not None and value < minimum) \
            or (maximum is not None and value > maximum):
        bounds = f">= {minimum:g}" if maximum is None or maximum >= _INT_LIMIT else f"from {minimum:g} to {maximum:g}"
        raise ConfigError(name, value, f"an integer {bounds}")


# Form sections of the settings most runs leave at their defaults.
_KERNELS = "Compiler, kernels and allocator"
_RANKS = "Data parallel (several processes)"


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
                                   sweep="none,default", words="compiled ({})", group=_KERNELS)
    optimizer: Optimizer = setting("adamw", label="Optimizer",
                                   help="optimizer (adafactor: torch.optim.Adafactor, factored second moments)",
                                   sweep="adamw,sgd,adafactor", words="{}")
    optimizer_impl: OptimizerImpl = setting("auto", label="Optimizer implementation",
                                            help="how the optimizer step runs: fused (one kernel), foreach "
                                                 "(multi-tensor kernels) or loop (per parameter); auto: fused where "
                                                 "the optimizer and device support it (adamw and sgd on CUDA), "
                                                 "else foreach",
                                            sweep="fused,foreach,loop", check=_check_optimizer_impl,
                                            words="{} optimizer step", group=_KERNELS)
    attention: Attention = setting("auto", label="Attention kernel",
                                   help="scaled-dot-product attention backend for forward and backward "
                                        "(torch.nn.attention.sdpa_kernel); auto: torch picks",
                                   sweep="math,flash", check=_check_attention, words="{} attention",
                                   group=_KERNELS)
    alloc_conf: str | None = setting(None, label="CUDA allocator settings",
                                     help="CUDA caching-allocator settings of the worker process "
                                          "(PYTORCH_CUDA_ALLOC_CONF syntax), e.g. expandable_segments:True; "
                                          "CUDA only",
                                     allowed=_ALLOC_CONF_ALLOWED, check=_check_alloc_conf,
                                     sweep="expandable_segments:False,expandable_segments:True", words="allocator {}",
                                     group=_KERNELS)
    warmup: int = setting(3, label="Warm-up steps (not measured)", help="warm-up optimizer steps (not measured)",
                          minimum=0, check=_check_warmup)
    steps: int = setting(10, label="Measured steps", help="measured optimizer steps", minimum=1)
    device: str = setting("auto", label="Device", help="device to run on", allowed=_DEVICE_ALLOWED, check=_check_device)
    memory_cap_gib: float | None = setting(None, label="Memory cap (GiB)", unit="GiB", minimum=0, minimum_exclusive=True,
                                           step=0.5, help="cap memory to emulate a smaller device (GiB)")
    timeout_s: float = setting(600.0, label="Timeout (s)", flag="--timeout", unit="seconds", minimum=0,
                               minimum_exclusive=True, step=30.0, help="wall-clock limit for the run (seconds)")
    seed: int = setting(0, label="Seed", help="random seed", minimum=0)
    nproc: int = setting(1, label="Processes (ranks)", help="data-parallel ranks, one GPU each on CUDA "
                         "(each trains on its own micro-batches)", minimum=1, sweep="1,2", group=_RANKS)
    parallel: Parallel = setting("none", label="Data parallel", help="how the ranks share the model: DDP "
                                 "(replicated) or FSDP (sharded, torch.distributed.fsdp.fully_shard)",
                                 sweep="ddp,fsdp", check=_check_parallel,
                                 choice_words={"ddp": "DDP (replicated)", "fsdp": "FSDP (sharded)"}, group=_RANKS)
    reshard: bool = setting(True, label="FSDP: reshard after forward",
                            help="FSDP frees the gathered parameters after forward and gathers them again "
                                 "in backward (less memory, more communication)",
                            sweep="true,false", applies_when=("parallel", ("fsdp",)), group=_RANKS)

    def __post_init__(self) -> None:
        for config_field in CONFIG_FIELDS:
            config_field.check(self)

    # -- derived values and (de)serialisation -------------------------------------------
    @property
    def effective_batch(self) -> int:
        """Samples per optimizer step: micro-batch × accumulation steps × ranks."""
        return self.batch * self.accum * self.nproc

    @property
    def distributed(self) -> bool:
        """Whether the run goes through torch.distributed (ranks launched by its launcher)."""
        return self.parallel != "none"

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
        parts += self.settings_words()
        if self.distributed:
            parts.append(parallel_words(self.parallel, self.nproc, self.reshard))
        return ", ".join(parts)

    def settings_words(self) -> list[str]:
        """The described fields (optimizer, attention...) not at their default, in words
        ("adafactor", "math attention")."""
        return [f.words(getattr(self, f.name)) for f in DESCRIBED_FIELDS if getattr(self, f.name) != f.default]


def parallel_words(parallel: str, nproc: int, reshard: bool = True) -> str:
    """Data parallelism in words ("DDP × 2 ranks", "FSDP × 4 ranks, no reshard")."""
    words = f"{parallel.upper()} × {nproc} rank{'s' if nproc != 1 else ''}"
    return words + (", no reshard" if parallel == "fsdp" and not reshard else "")


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


def gpus_needed(config: BenchConfig) -> int:
    """How many GPUs a run of ``config`` occupies, for an executor that reserves them (Ray's
    ``num_gpus``): one per rank on a CUDA device (``cuda``, ``cuda:N`` and ``auto``, which means
    a GPU wherever there is one: an executor resolves ``auto`` on a machine without GPUs
    first), none for ``cpu`` and ``mps``. Pure: it never looks at this machine."""
    return config.nproc if config.device == "auto" or config.device.startswith("cuda") else 0


# --------------------------------------------------------------------------- field views
@dataclass(frozen=True)
class ConfigField:
    """One BenchConfig field as front ends see it: its name, type, default and ``FieldSpec``.

    ``kind`` is ``int``, ``float``, ``bool``, ``str`` or ``dict``; ``choices`` the allowed values of a
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
        if self.kind is bool:
            return "true or false"
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
        elif self.kind is bool:
            if not isinstance(value, bool):
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
        if self.kind is bool:
            words = {"true": True, "false": False, "1": True, "0": False, "yes": True, "no": False}
            if text.lower() not in words:
                raise ConfigError(self.name, text, self.allowed())
            return words[text.lower()]
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
        if self.kind is bool:
            return "true" if value else "false"
        if self.kind is float:
            return f"{value:g}"
        return str(value)

    def words(self, value: Any) -> str:
        """``value`` as a configuration's description says it (``spec.words``)."""
        return self.spec.words.format(self.format(value))

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
# Fields a description and a run label name when not at their default (after model, batch,
# precision and checkpointing, which are always said).
DESCRIBED_FIELDS: tuple[ConfigField, ...] = tuple(f for f in CONFIG_FIELDS if f.spec.words)


def sweep_values(field: ConfigField) -> list:
    """The typed values a newly picked sweep axis starts with (from its declaration)."""
    return [field.parse(part) for part in field.spec.sweep.split(",")]


def parse_override(key: str, text: str) -> int:
    """The value of one model dimension from text (``--set seq_len=256``, a link's ``seq_len``)."""
    name = f"overrides.{key}"
    if not re.fullmatch(r"\s*[+-]?\d{1,19}\s*", text):
        raise ConfigError(name, text, "an integer >= 1")
    return int(text)


def parse_override_values(key: str, text: str) -> list[int]:
    """The values of one model dimension from a comma list (``--set seq_len=128,256`` of a
    sweep, a sweep link's ``sweep_seq_len``), each by ``parse_override``: a bad one is named
    with its key."""
    return [parse_override(key, part) for part in text.split(",")]


# --------------------------------------------------------------------------- this machine
def selective_checkpoint_available() -> bool:
    """Whether the installed torch has selective activation checkpointing (torch >= 2.4)."""
    import torch.utils.checkpoint as ckpt

    return hasattr(ckpt, "create_selective_checkpoint_contexts")


def adafactor_available() -> bool:
    """Whether the installed torch has ``torch.optim.Adafactor`` (torch >= 2.5)."""
    import torch.optim

    return hasattr(torch.optim, "Adafactor")


def check_runnable(config: BenchConfig, *, check_memory: bool = True) -> None:
    """The checks that need this machine, called just before a run: the config is within
    this server's limits (``engine.limits``), the device is present, a memory cap fits it,
    allocator settings go to a CUDA device, the attention backend runs on the device (its
    compute capability, from the device probe), the torch has the optimizer and the
    checkpointing policy, a user model imports and honours the contract
    (built on the meta device, so it allocates nothing), and, unless ``check_memory`` is
    False (the CLI's ``--force``; the batch finder, whose trials must meet their real OOM),
    its analytic peak memory is not several times what the device has.

    Raises ConfigError naming the field, as value checks do. Limits apply here, where a run
    is requested, never to reading stored results.
    """
    from . import limits  # imports this module: loaded on first use

    limits.check_limits(config)
    _check_device_present(config.device)
    _check_gpus_for_ranks(config)
    resolved = devices.resolve_device(config.device)
    if config.device == "auto" and config.warmup < minimum_warmup(resolved, config.precision, config.compile):
        _check_warmup(config.replace(device=resolved))  # "auto" is a GPU here: its rule applies
    device_type = resolved.split(":")[0]
    if config.alloc_conf is not None and device_type != "cuda":
        _no_cuda_allocator(config.alloc_conf, resolved)
    if config.attention != "auto":
        gpu = devices.cuda_gpu_or_none(resolved)
        capability = gpu.capability if gpu is not None else None
        words = resolved if gpu is None else f"{resolved} ({gpu.name}" + (
            f", compute capability {capability[0]}.{capability[1]})" if capability else ")")
        check_attention_backend(config.attention, device_type, config.precision, words, capability)
    if config.optimizer == "adafactor" and not adafactor_available():
        raise ConfigError("optimizer", config.optimizer, "adamw, sgd (this torch has no Adafactor; it needs torch >= 2.5)")
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


def _check_gpus_for_ranks(config: BenchConfig) -> None:
    """On CUDA each rank has its own GPU: the ``nproc`` GPUs from the config's device on."""
    resolved = devices.resolve_device(config.device)
    needed = config.nproc
    if needed <= 1 or not resolved.startswith("cuda"):
        return
    count = devices.cuda_device_count()
    first = int(resolved.split(":")[1]) if ":" in resolved else 0
    if first + needed > count:
        where = f"from cuda:{first} on" if first else "here"
        raise ConfigError("nproc", config.nproc, f"at most {count - first} (one GPU per rank; {count - first} "
                          f"CUDA GPU{'s are' if count - first != 1 else ' is'} visible {where})")


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
