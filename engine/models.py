"""Built-in benchmark models, Hugging Face architectures by name and the user-model contract.

Every model follows one contract: a builder returns ``(model, make_batch)`` where
``make_batch(batch_size, device)`` returns a tuple and ``model(*batch)`` returns a scalar
loss. Repeated blocks live in ``model.blocks`` (an ``nn.ModuleList``) so checkpointing
policies can wrap them; a user model or an ``hf:`` model without that attribute has its
blocks found (the repeated module class holding the most parameters, across every stage:
``hf.transformer.h.*``, ``hf.model.layers.*``), or named with ``--blocks``.
"""
from __future__ import annotations

import fnmatch
import importlib
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import hf_table
from .presets import is_user_model, preset_dims

MakeBatch = Callable[[int, torch.device], tuple]

# ---------------------------------------------------------------- GPT (nanoGPT-style)
@dataclass(frozen=True)
class GPTDims:
    seq_len: int
    d_model: int
    n_layers: int
    n_heads: int
    vocab: int


class CausalSelfAttention(nn.Module):
    def __init__(self, d: GPTDims):
        super().__init__()
        self.n_heads = d.n_heads
        self.qkv = nn.Linear(d.d_model, 3 * d.d_model)
        self.proj = nn.Linear(d.d_model, d.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        # (B, T, C) -> (B, nh, T, hs)
        q, k, v = (t.view(B, T, self.n_heads, C // self.n_heads).transpose(1, 2) for t in (q, k, v))
        # SDPA never materialises the (T, T) attention matrix on flash/mem-efficient kernels.
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).contiguous().view(B, T, C))


class GPTBlock(nn.Module):
    def __init__(self, d: GPTDims):
        super().__init__()
        self.ln_1 = nn.LayerNorm(d.d_model)
        self.attn = CausalSelfAttention(d)
        self.ln_2 = nn.LayerNorm(d.d_model)
        self.fc = nn.Linear(d.d_model, 4 * d.d_model)
        self.fc_proj = nn.Linear(4 * d.d_model, d.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.fc_proj(F.gelu(self.fc(self.ln_2(x)), approximate="tanh"))


class GPT(nn.Module):
    """Decoder-only transformer, pre-LayerNorm, tied input/output embeddings."""

    def __init__(self, d: GPTDims):
        super().__init__()
        self.dims = d
        self.tokens_per_sample = d.seq_len
        self.wte = nn.Embedding(d.vocab, d.d_model)
        self.wpe = nn.Embedding(d.seq_len, d.d_model)
        self.blocks = nn.ModuleList(GPTBlock(d) for _ in range(d.n_layers))
        self.ln_f = nn.LayerNorm(d.d_model)
        self.lm_head = nn.Linear(d.d_model, d.vocab, bias=False)
        self.lm_head.weight = self.wte.weight
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        B, T = idx.shape
        pos = torch.arange(T, device=idx.device)
        x = self.wte(idx) + self.wpe(pos)  # (B, T, C)
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))  # (B, T, vocab)
        return F.cross_entropy(logits.view(B * T, -1), targets.view(B * T))


def build_gpt(dims: dict[str, int]) -> tuple[nn.Module, MakeBatch]:
    d = GPTDims(**dims)
    model = GPT(d)

    def make_batch(batch_size: int, device: torch.device) -> tuple:
        idx = torch.randint(0, d.vocab, (batch_size, d.seq_len), device=device)
        targets = torch.randint(0, d.vocab, (batch_size, d.seq_len), device=device)
        return idx, targets

    return model, make_batch


# ---------------------------------------------------------------- MLP
class ResidualMLPBlock(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + F.gelu(self.fc(self.norm(x)))


class MLP(nn.Module):
    def __init__(self, in_features: int, width: int, depth: int, num_classes: int):
        super().__init__()
        self.stem = nn.Linear(in_features, width)
        self.blocks = nn.ModuleList(ResidualMLPBlock(width) for _ in range(depth))
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)  # (B, width)
        for block in self.blocks:
            h = block(h)
        return F.cross_entropy(self.head(h), y)


def build_mlp(dims: dict[str, int]) -> tuple[nn.Module, MakeBatch]:
    model = MLP(dims["in_features"], dims["width"], dims["depth"], dims["num_classes"])

    def make_batch(batch_size: int, device: torch.device) -> tuple:
        x = torch.randn(batch_size, dims["in_features"], device=device)
        y = torch.randint(0, dims["num_classes"], (batch_size,), device=device)
        return x, y

    return model, make_batch


# ---------------------------------------------------------------- CNN (ResNet-style)
class BasicBlock(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.conv1 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(x + self.bn2(self.conv2(out)))


class ResNetish(nn.Module):
    def __init__(self, channels: int, width: int, depth: int, num_classes: int):
        super().__init__()
        # A stride-2 stem, then equal-width blocks: every block has the same shape, so
        # checkpointing any subset of them is comparable.
        self.stem = nn.Sequential(
            nn.Conv2d(channels, width, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
        )
        self.blocks = nn.ModuleList(BasicBlock(width) for _ in range(depth))
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)  # (B, width, H/2, W/2)
        for block in self.blocks:
            h = block(h)
        return F.cross_entropy(self.head(h.mean(dim=(2, 3))), y)


def build_cnn(dims: dict[str, int]) -> tuple[nn.Module, MakeBatch]:
    model = ResNetish(dims["channels"], dims["width"], dims["depth"], dims["num_classes"])
    size = dims["image_size"]

    def make_batch(batch_size: int, device: torch.device) -> tuple:
        x = torch.randn(batch_size, dims["channels"], size, size, device=device)
        y = torch.randint(0, dims["num_classes"], (batch_size,), device=device)
        return x, y

    return model, make_batch


_FAMILY_BUILDERS = {"gpt": build_gpt, "mlp": build_mlp, "cnn": build_cnn}


# ---------------------------------------------------------------- Hugging Face (hf:NAME)
class HFCausalLM(nn.Module):
    """A transformers causal LM under the ``(model, make_batch)`` contract: ``forward(idx,
    targets)`` returns the scalar loss. Its blocks are the model's own (``hf.transformer.h``,
    ``hf.model.layers``), found like any user model's.

    The loss is the presets' (cross-entropy of the logits against ``targets``), not the
    model's ``labels=`` loss: the memory estimate and the FLOPs then treat both alike, and
    random targets need no shift."""

    def __init__(self, hf: nn.Module, seq_len: int):
        super().__init__()
        self.hf = hf
        self.tokens_per_sample = seq_len

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        B, T = idx.shape
        logits = self.hf(input_ids=idx, use_cache=False).logits  # (B, T, vocab)
        return F.cross_entropy(logits.view(B * T, -1), targets.view(B * T))


def build_hf(name: str, overrides: dict | None = None) -> tuple[nn.Module, MakeBatch]:
    """``hf:NAME`` built from its configuration class with random weights (never downloaded)."""
    import transformers  # loaded only here: configuration and validation must not pay for it

    config_class, model_class, kwargs = hf_table.config_kwargs(name, overrides)
    dims = hf_table.dims(name, overrides)
    config = getattr(transformers, config_class)(**kwargs)
    model = HFCausalLM(getattr(transformers, model_class)(config), dims["seq_len"])
    vocab, seq_len = dims["vocab_size"], dims["seq_len"]

    def make_batch(batch_size: int, device: torch.device) -> tuple:
        idx = torch.randint(0, vocab, (batch_size, seq_len), device=device)
        targets = torch.randint(0, vocab, (batch_size, seq_len), device=device)
        return idx, targets

    return model, make_batch


# ---------------------------------------------------------------- user models
def load_user_builder(spec: str) -> Callable[[], tuple]:
    """Import ``module:function`` and return the function (raises ImportError/AttributeError)."""
    module_name, _, func_name = spec.partition(":")
    module = importlib.import_module(module_name)
    func = getattr(module, func_name)
    if not callable(func):
        raise TypeError(f"{spec} is not callable")
    return func


def check_contract(built: object, spec: str) -> tuple[nn.Module, MakeBatch]:
    """Return ``built`` if it is ``(nn.Module, callable)``; raise TypeError saying what it is."""
    if not (isinstance(built, tuple) and len(built) == 2):
        raise TypeError(f"{spec}() must return (model, make_batch), got {type(built).__name__}")
    model, make_batch = built
    if not isinstance(model, nn.Module):
        raise TypeError(f"{spec}() returned {type(model).__name__} as model, expected torch.nn.Module")
    if not callable(make_batch):
        raise TypeError(f"{spec}() returned a non-callable make_batch ({type(make_batch).__name__})")
    return model, make_batch



def build(model_name: str, overrides: dict | None = None) -> tuple[nn.Module, MakeBatch]:
    """Build a preset or ``hf:`` model (with overrides) or a user ``module:function`` model on
    the current device."""
    if is_user_model(model_name):
        return check_contract(load_user_builder(model_name)(), model_name)
    if hf_table.is_hf(model_name):
        return build_hf(model_name, overrides)
    family, dims = preset_dims(model_name, overrides)
    return _FAMILY_BUILDERS[family](dims)


_CONTAINERS = (nn.ModuleList, nn.Sequential, nn.ModuleDict)


@dataclass(frozen=True)
class Blocks:
    """The repeated blocks of a model, in registration (forward) order: module paths as
    ``named_modules`` names them, the modules, and how they were found."""

    paths: tuple[str, ...]
    modules: tuple[nn.Module, ...]
    source: str

    @property
    def classes(self) -> list[str]:
        """The blocks' class names, each once."""
        return list(dict.fromkeys(type(m).__name__ for m in self.modules))


def _unique_params(modules) -> dict[int, nn.Parameter]:
    return {id(p): p for module in modules for p in module.parameters()}


def _outermost(names: list[str]) -> list[str]:
    """Names not nested inside another of the names (``layer1.0`` drops ``layer1.0.conv1``)."""
    kept: list[str] = []
    for name in sorted(names, key=lambda n: n.count(".")):
        if not any(name.startswith(k + ".") for k in kept):
            kept.append(name)
    return [n for n in names if n in kept]


def _largest_block_class(model: nn.Module) -> list[str]:
    """Paths of the instances (outermost) of the repeated module class that holds the most
    parameters, wherever they sit (``layer1..layer4``, ``transformer.h``, ``model.layers``).
    Only composite modules count: checkpointing a single layer keeps its input anyway."""
    by_class: dict[type, list[str]] = {}
    named = dict(model.named_modules())
    for name, module in named.items():
        if name and not isinstance(module, _CONTAINERS) and any(True for _ in module.children()) \
                and any(True for _ in module.parameters()):
            by_class.setdefault(type(module), []).append(name)
    best, best_key = [], None
    for cls, names in by_class.items():
        names = _outermost(names)
        if len(names) < 2:
            continue
        key = (sum(p.numel() for p in _unique_params(named[n] for n in names).values()), len(names))
        if best_key is None or key > best_key:
            best, best_key = names, key
    return best


def find_blocks(model: nn.Module, patterns: str | None = None) -> Blocks | None:
    """The model's repeated blocks, the units checkpointing wraps, or None.

    ``patterns``: the user's choice, space-separated module paths or fnmatch patterns
    (``"layer*.*"``, ``"transformer.h.*"``); else ``model.blocks`` when the model has one
    (the built-in presets, and the ``build()`` contract's way to say it); else every instance
    of the repeated module class that holds the most parameters, across all stages.
    """
    named = dict(model.named_modules())
    if patterns:
        wanted = patterns.split()
        paths = _outermost([n for n in named if n and any(fnmatch.fnmatchcase(n, p) for p in wanted)])
        source = f"--blocks {patterns}"
    elif isinstance(getattr(model, "blocks", None), (nn.ModuleList, nn.Sequential)) and len(model.blocks) > 0:
        paths = [f"blocks.{i}" for i in range(len(model.blocks))]
        source = "model.blocks"
    else:
        paths = _largest_block_class(model)
        source = "found: the repeated module class holding the most parameters"
    if not paths:
        return None
    return Blocks(tuple(paths), tuple(named[p] for p in paths), source)


def param_share(model: nn.Module, modules) -> float:
    """The fraction of the model's (unique) parameter elements inside ``modules``."""
    total = count_params(model)
    inside = sum(p.numel() for p in _unique_params(modules).values())
    return inside / total if total else 0.0


def batch_norm_layers(model: nn.Module) -> list[str]:
    """Paths of the layers that normalise with batch statistics in training (BatchNorm of any
    dimension, SyncBatchNorm): with them a micro-batch is not a slice of a bigger batch."""
    return [name for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def tokens_per_sample(model: nn.Module) -> int | None:
    """Tokens in one sample for sequence models (``model.tokens_per_sample``), else None."""
    value = getattr(model, "tokens_per_sample", None)
    return int(value) if isinstance(value, int) else None


def count_params(model: nn.Module) -> int:
    """Unique parameter elements (tied weights counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


__all__ = ["build", "find_blocks", "Blocks", "param_share", "batch_norm_layers", "tokens_per_sample", "count_params",
           "load_user_builder", "check_contract"]
