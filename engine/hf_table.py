"""Hugging Face ``transformers`` architectures by name, as plain data (no torch, no transformers).

``--model hf:NAME`` builds the architecture of one row from its configuration class with
random weights: nothing is downloaded, no ``from_pretrained``. Each row holds the published
``config.json``'s hyperparameters and cites it; its integer keys are the ``--set`` keys (the
configuration's own names) plus ``seq_len``, so configuration, validation, forms and links
check them without importing transformers (which imports torch).

What every row leaves out of its ``config.json``, on purpose:

* dropout (GPT-2 publishes 0.1): off, as in the built-in presets and in the Llama, Qwen and
  Mistral configs. A benchmark of memory and speed then compares like with like, and
  attention dropout would push GPT-2's SDPA off its fused kernels onto the math one.
* ``head_dim``: derived as hidden_size / num_attention_heads (it is exactly that in every
  row), so ``--set hidden_size=64`` keeps a consistent model.
* ``rope_scaling`` (Llama 3.1/3.2): it only rescales the rotary frequencies; shapes and cost
  are those of plain RoPE.
"""
from __future__ import annotations

from dataclasses import dataclass, field

PREFIX = "hf:"


@dataclass(frozen=True)
class HFArch:
    """One architecture: its family (which transformers classes build it), the integer
    hyperparameters ``--set`` may change, the fixed rest of its configuration, the default
    sequence length, its ``config.json`` and its published parameter count with the source."""

    family: str  # "gpt2", "llama", "qwen2", "mistral"
    dims: dict[str, int]
    fixed: dict = field(default_factory=dict)
    seq_len: int = 2048
    source: str = ""
    published_params: float = 0.0
    params_source: str = ""


# The configuration and model classes of each family, by name (imported only when built).
FAMILY_CLASSES: dict[str, tuple[str, str]] = {
    "gpt2": ("GPT2Config", "GPT2LMHeadModel"),
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
}

# Configuration keys that mean the same thing under GPT-2's names and the others'.
GPT2_NAMES = {"layers": "n_layer", "hidden": "n_embd", "heads": "n_head", "vocab": "vocab_size"}
LLAMA_NAMES = {"layers": "num_hidden_layers", "hidden": "hidden_size", "heads": "num_attention_heads",
               "vocab": "vocab_size", "kv_heads": "num_key_value_heads", "inner": "intermediate_size"}

_GPT2_FIXED = {"activation_function": "gelu_new", "layer_norm_epsilon": 1e-5, "attn_pdrop": 0.0,
               "resid_pdrop": 0.0, "embd_pdrop": 0.0}
_HF = "https://huggingface.co"


def _gpt2(n_layer: int, n_embd: int, n_head: int, repo: str, params: float, params_source: str) -> HFArch:
    return HFArch("gpt2", {"n_layer": n_layer, "n_embd": n_embd, "n_head": n_head, "vocab_size": 50257,
                           "n_positions": 1024}, _GPT2_FIXED, 1024, f"{_HF}/{repo}/blob/main/config.json",
                  params, params_source)


def _decoder(family: str, layers: int, hidden: int, heads: int, kv_heads: int, inner: int, vocab: int, fixed: dict,
             repo: str, params: float, params_source: str | None = None) -> HFArch:
    dims = {"num_hidden_layers": layers, "hidden_size": hidden, "num_attention_heads": heads,
            "num_key_value_heads": kv_heads, "intermediate_size": inner, "vocab_size": vocab}
    return HFArch(family, dims, {"hidden_act": "silu", "attention_dropout": 0.0, **fixed}, 2048,
                  f"{_HF}/{repo}/blob/main/config.json", params, params_source or f"{_HF}/{repo} (model size)")


_LLAMA3 = {"rms_norm_eps": 1e-5, "rope_theta": 500000.0, "max_position_embeddings": 131072}
_QWEN25 = {"rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "max_position_embeddings": 32768,
           "tie_word_embeddings": True, "use_sliding_window": False}

HF_MODELS: dict[str, HFArch] = {
    "gpt2": _gpt2(12, 768, 12, "openai-community/gpt2", 124e6,
                  f"{_HF}/openai-community/gpt2 (model card: 124M parameters)"),
    "gpt2-medium": _gpt2(24, 1024, 16, "openai-community/gpt2-medium", 355e6,
                         f"{_HF}/openai-community/gpt2-medium (model card: 355M parameters)"),
    "gpt2-large": _gpt2(36, 1280, 20, "openai-community/gpt2-large", 774e6,
                        f"{_HF}/openai-community/gpt2-large (model card: 774M parameters)"),
    # The model card rounds to 1.5B; nanoGPT's table gives the count to 1M.
    "gpt2-xl": _gpt2(48, 1600, 25, "openai-community/gpt2-xl", 1558e6,
                     "https://github.com/karpathy/nanoGPT#baselines (gpt2-xl: 1558M params)"),
    "llama-3.2-1b": _decoder("llama", 16, 2048, 32, 8, 8192, 128256, {**_LLAMA3, "tie_word_embeddings": True},
                             "meta-llama/Llama-3.2-1B", 1.23e9,
                             f"{_HF}/meta-llama/Llama-3.2-1B (model card: 1.23B params)"),
    "llama-3.2-3b": _decoder("llama", 28, 3072, 24, 8, 8192, 128256, {**_LLAMA3, "tie_word_embeddings": True},
                             "meta-llama/Llama-3.2-3B", 3.21e9,
                             f"{_HF}/meta-llama/Llama-3.2-3B (model card: 3.21B params)"),
    "llama-3.1-8b": _decoder("llama", 32, 4096, 32, 8, 14336, 128256, {**_LLAMA3, "tie_word_embeddings": False},
                             "meta-llama/Llama-3.1-8B", 8.03e9),
    "qwen2.5-0.5b": _decoder("qwen2", 24, 896, 14, 2, 4864, 151936, _QWEN25, "Qwen/Qwen2.5-0.5B", 0.49e9,
                             f"{_HF}/Qwen/Qwen2.5-0.5B (model card: 0.49B parameters)"),
    "qwen2.5-1.5b": _decoder("qwen2", 28, 1536, 12, 2, 8960, 151936, _QWEN25, "Qwen/Qwen2.5-1.5B", 1.54e9,
                             f"{_HF}/Qwen/Qwen2.5-1.5B (model card: 1.54B parameters)"),
    "mistral-7b": _decoder("mistral", 32, 4096, 32, 8, 14336, 32000,
                           {"rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 32768,
                            "sliding_window": 4096, "tie_word_embeddings": False},
                           "mistralai/Mistral-7B-v0.1", 7.24e9),
}


def is_hf(name: str) -> bool:
    """Whether ``name`` asks for a Hugging Face architecture (``hf:NAME``)."""
    return isinstance(name, str) and name.startswith(PREFIX)


def hf_names() -> list[str]:
    """Every ``hf:NAME`` of the table."""
    return [PREFIX + name for name in HF_MODELS]


def arch(name: str) -> HFArch:
    """The row of ``hf:NAME`` (KeyError when the table has none)."""
    return HF_MODELS[name.removeprefix(PREFIX)]


def dims(name: str, overrides: dict | None = None) -> dict[str, int]:
    """The ``--set`` keys of ``hf:NAME`` with their values, ``overrides`` applied."""
    row = arch(name)
    return {**row.dims, "seq_len": row.seq_len, **(overrides or {})}


def names(family: str) -> dict[str, str]:
    """The family's configuration key for each common concept (layers, hidden, heads, vocab...)."""
    return GPT2_NAMES if family == "gpt2" else LLAMA_NAMES


def dimension_problem(family: str, values: dict[str, int]) -> tuple[str, str] | None:
    """(key, what is allowed) when the dimensions do not make a model, else None: the heads
    divide the hidden size, the key/value heads divide the heads, GPT-2's learned positions
    cover the sequence."""
    n = names(family)
    hidden, heads = values[n["hidden"]], values[n["heads"]]
    if hidden % heads:
        return n["heads"], f"a divisor of {n['hidden']} ({hidden})"
    if family == "gpt2":
        if values["seq_len"] > values["n_positions"]:
            return "seq_len", f"at most n_positions ({values['n_positions']}), GPT-2's learned positions"
    elif heads % values["num_key_value_heads"]:
        return "num_key_value_heads", f"a divisor of num_attention_heads ({heads})"
    return None


def config_kwargs(name: str, overrides: dict | None = None) -> tuple[str, str, dict]:
    """(configuration class, model class, keyword arguments) that build ``hf:NAME`` with
    ``overrides``: the row's hyperparameters, SDPA attention and no KV cache. Special token
    ids are dropped: they matter to generation only, and a shrunk vocabulary would not hold
    them."""
    row = arch(name)
    values = dims(name, overrides)
    values.pop("seq_len")
    config_class, model_class = FAMILY_CLASSES[row.family]
    no_tokens = dict.fromkeys(("bos_token_id", "eos_token_id", "pad_token_id"))
    return config_class, model_class, {**row.fixed, **values, **no_tokens, "use_cache": False,
                                       "attn_implementation": "sdpa"}
