"""The built-in model presets and their dimensions, as plain data (no torch).

``engine.models`` builds them; configuration, validation, forms and links only need the
names and dimensions, and must not pay for importing torch to get them.
"""
from __future__ import annotations

from . import hf_table

# Dimension names and defaults per family; a preset only changes some of them.
FAMILY_DEFAULTS: dict[str, dict[str, int]] = {
    "gpt": {"seq_len": 1024, "d_model": 768, "n_layers": 12, "n_heads": 12, "vocab": 50304},
    "mlp": {"in_features": 1024, "width": 1024, "depth": 4, "num_classes": 10},
    "cnn": {"image_size": 64, "channels": 3, "width": 64, "depth": 4, "num_classes": 10},
}

# GPT-2 family dimensions (Radford et al. 2019); vocab padded to a multiple of 64 as in
# nanoGPT, which keeps the tied embedding matmul on fast kernels.
PRESETS: dict[str, tuple[str, dict[str, int]]] = {
    "gpt-tiny": ("gpt", {"seq_len": 128, "d_model": 192, "n_layers": 4, "n_heads": 6, "vocab": 8192}),
    "gpt-small": ("gpt", {"d_model": 768, "n_layers": 12, "n_heads": 12}),
    "gpt-medium": ("gpt", {"d_model": 1024, "n_layers": 24, "n_heads": 16}),
    "gpt-large": ("gpt", {"d_model": 1280, "n_layers": 36, "n_heads": 20}),
    "gpt-xl": ("gpt", {"d_model": 1600, "n_layers": 48, "n_heads": 25}),
    "mlp": ("mlp", {}),
    "cnn": ("cnn", {}),
}


# Every model a name picks: the presets, then the Hugging Face architectures (hf:NAME).
MODELS: tuple[str, ...] = (*PRESETS, *hf_table.hf_names())


# Families whose models compute attention (with F.scaled_dot_product_attention).
ATTENTION_FAMILIES = ("gpt",)


def has_attention(name: str) -> bool | None:
    """Whether model ``name`` computes attention: a preset by its family, an ``hf:``
    architecture always (built with SDPA); None (unknown) for a user's module:function."""
    if is_user_model(name):
        return None
    if hf_table.is_hf(name):
        return True
    if name not in PRESETS:
        return None
    return PRESETS[name][0] in ATTENTION_FAMILIES


def is_user_model(name: str) -> bool:
    """Whether ``name`` is a user's ``module:function`` rather than a preset or an ``hf:`` name."""
    return ":" in name and not hf_table.is_hf(name)


def preset_dims(name: str, overrides: dict | None = None) -> tuple[str, dict[str, int]]:
    """Family and full dimension dict of a preset or ``hf:`` model with ``overrides`` applied
    (an ``hf:`` model's family is its transformers family, e.g. ``llama``)."""
    if hf_table.is_hf(name):
        return hf_table.arch(name).family, hf_table.dims(name, overrides)
    family, dims = PRESETS[name]
    merged = {**FAMILY_DEFAULTS[family], **dims, **(overrides or {})}
    return family, merged


def accepted_dimensions(model: str) -> dict[str, int]:
    """The model dimensions ``model`` accepts (its ``--set`` keys) with their values, in a
    stable order; empty for a user's ``module:function`` or a name that is no preset. Forms,
    links and sweep axes ask here, so a new kind of model offers its keys everywhere at once."""
    if is_user_model(model) or model not in MODELS:
        return {}
    return preset_dims(model)[1]


def dimension_names() -> list[str]:
    """Every model dimension any preset or ``hf:`` model has (the ``--set`` keys), in a stable order."""
    names: dict[str, None] = {}
    for defaults in FAMILY_DEFAULTS.values():
        names.update(dict.fromkeys(defaults))
    for name in hf_table.hf_names():
        names.update(dict.fromkeys(hf_table.dims(name)))
    return list(names)


def gpt_param_count(dims: dict[str, int]) -> int:
    """Exact parameter count of the GPT preset model with these dims (tied head counted once)."""
    C, L, V, T = dims["d_model"], dims["n_layers"], dims["vocab"], dims["seq_len"]
    per_block = 2 * 2 * C + (3 * C * C + 3 * C) + (C * C + C) + (4 * C * C + 4 * C) + (4 * C * C + C)
    return V * C + T * C + L * per_block + 2 * C
