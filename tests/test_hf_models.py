"""Hugging Face architectures by name (``--model hf:NAME``): built from their configuration
classes with random weights, measured like the presets through the real measuring path,
predicted by the analytic estimate, validated and linked without importing transformers."""
import os
import subprocess
import sys

import pytest

from engine import cli, expect, hf_table, memory, predict, presets
from engine.config import CKPT_POLICIES, BenchConfig, ConfigError
from engine.devices import this_host_id
from engine.measure import run_benchmark
from engine.step import build_step
from app import form, params
from tests.app_fixtures import app_db, open_app  # noqa: F401

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Tiny dimensions in each family's own keys. A vocabulary of 4096 against a hidden size of 64
# keeps the full-size proportion (vocab 32k-152k against hidden 0.8k-4k): the
# log-probabilities dominate and the peak sits at the start of backward, as it does there.
TINY = {
    "hf:gpt2": {"n_layer": 2, "n_embd": 64, "n_head": 4, "vocab_size": 4096, "seq_len": 32},
    "hf:llama-3.2-1b": {"num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4,
                        "num_key_value_heads": 2, "intermediate_size": 128, "vocab_size": 4096, "seq_len": 32},
}
BLOCKS = {"hf:gpt2": ("hf.transformer.h.0", "hf.transformer.h.1"),
          "hf:llama-3.2-1b": ("hf.model.layers.0", "hf.model.layers.1")}
CLASSES = {"hf:gpt2": ("GPT2Block",), "hf:llama-3.2-1b": ("LlamaDecoderLayer",)}


def tiny(model: str, **fields) -> BenchConfig:
    return BenchConfig(**{"model": model, "overrides": TINY[model], "batch": 4, "warmup": 1, "steps": 2,
                          "device": "cpu", **fields})


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("model", list(TINY))
def test_every_checkpointing_policy_runs_on_the_real_blocks_and_meets_the_analytic_peak(model, precision):
    results = {}
    for ckpt in CKPT_POLICIES:
        config = tiny(model, precision=precision, ckpt=ckpt, k=2)
        result = run_benchmark(config)
        assert result.status == "ok", result.error
        m = result.metrics
        assert m.samples_per_s > 0 and m.tokens_per_s == pytest.approx(m.samples_per_s * 32)
        assert m.flops_per_step > 0
        # The analytic peak's error against the measurement, as the predict command and the
        # Decide page show it.
        [row] = predict.comparison_rows([(4, m.peak_allocated_bytes)], None, config)
        estimate = predict.analytic_estimate(config)
        assert abs(row["analytic_error"]) <= 0.05, (ckpt, row, estimate.notes)
        # Shown before a run: the same analytic peak, a full estimate ("about").
        expected = expect.expect(config, [], this_host_id())
        assert (expected.peak_bytes, expected.peak_words) == (estimate.peak, "about")
        results[ckpt] = result
    assert results["none"].checkpointed is None
    for ckpt, wrapped in (("full", BLOCKS[model]), ("every-k", BLOCKS[model][:1]), ("selective", BLOCKS[model])):
        assert results[ckpt].checkpointed.paths == wrapped
        assert results[ckpt].checkpointed.classes == CLASSES[model]
    activations = {ckpt: r.metrics.memory_breakdown_bytes.activations for ckpt, r in results.items()}
    assert activations["full"] < activations["every-k"] < activations["none"]
    assert activations["full"] < activations["selective"] < activations["none"]


@pytest.mark.parametrize("model, precision, ckpt", [
    ("hf:qwen2.5-0.5b", "fp32", "none"),  # biased q/k/v projections
    ("hf:mistral-7b", "bf16", "selective"),  # untied embeddings
    ("hf:llama-3.1-8b", "bf16", "full"),  # untied embeddings
])
def test_the_other_families_meet_the_analytic_breakdown(model, precision, ckpt):
    config = BenchConfig(model=model, overrides={**TINY["hf:llama-3.2-1b"]}, batch=4, precision=precision, ckpt=ckpt,
                         device="cpu")
    step = build_step(config)
    step.run()  # optimizer state exists, as in a measured step
    measured = memory.memory_breakdown(step)
    estimate = predict.analytic_estimate(config)
    assert estimate.activations == pytest.approx(measured.activations, rel=0.05)
    assert estimate.peak == pytest.approx(measured.total, rel=0.05)


@pytest.mark.parametrize("model", list(TINY))
def test_analytic_flops_follow_the_counted_ones(model):
    config = tiny(model)
    counted = run_benchmark(config.replace(steps=1)).metrics.flops_per_step
    # 6N + attention counts every matmul; the counter sees the same matmuls, so they agree
    # to within the small terms the formula leaves out.
    assert expect.analytic_flops_per_step(config) == pytest.approx(counted, rel=0.10)


@pytest.mark.parametrize("name", hf_table.hf_names())
def test_full_size_parameter_counts_match_the_published_sizes(name):
    row = hf_table.arch(name)
    counted = predict.model_param_count(BenchConfig(model=name, device="cpu"))  # built on the meta device
    assert counted == pytest.approx(row.published_params, rel=0.01)
    assert row.source.startswith("https://huggingface.co/") and row.source.endswith("/config.json")
    assert row.params_source


def test_an_unknown_set_key_names_the_allowed_ones():
    with pytest.raises(ConfigError) as caught:
        BenchConfig(model="hf:gpt2", overrides={"hidden_size": 64})
    assert caught.value.field == "overrides.hidden_size"
    for key in ("n_layer", "n_embd", "n_head", "vocab_size", "n_positions", "seq_len"):
        assert key in caught.value.allowed
    with pytest.raises(ConfigError) as caught:
        BenchConfig(model="hf:mistral-7b", overrides={"n_layer": 2})
    assert "num_key_value_heads" in caught.value.allowed and "intermediate_size" in caught.value.allowed


def test_an_unknown_name_lists_the_table():
    with pytest.raises(ConfigError) as caught:
        BenchConfig(model="hf:gpt5")
    assert caught.value.field == "model"
    assert all(name in caught.value.allowed for name in hf_table.hf_names())


@pytest.mark.parametrize("overrides, field", [
    ({"n_embd": 64, "n_head": 5}, "overrides.n_head"),
    ({"seq_len": 2048}, "overrides.seq_len"),  # beyond GPT-2's 1024 learned positions
])
def test_dimensions_that_make_no_gpt2_are_refused(overrides, field):
    with pytest.raises(ConfigError) as caught:
        BenchConfig(model="hf:gpt2", overrides=overrides)
    assert caught.value.field == field


def test_key_value_heads_must_divide_the_heads():
    with pytest.raises(ConfigError) as caught:
        BenchConfig(model="hf:llama-3.2-1b", overrides={"num_key_value_heads": 5})
    assert caught.value.field == "overrides.num_key_value_heads" and "32" in caught.value.allowed


def test_the_cli_says_a_bad_key_in_one_line(capsys):
    assert cli.main(["run", "--model", "hf:gpt2", "--set", "hidden_size=64", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "n_embd" in err and "hidden_size" in err


def test_config_and_cli_parser_import_no_transformers():
    code = ("import sys; import engine.config, engine.cli, engine.hf_table; engine.cli.build_parser(); "
            "from engine.config import BenchConfig; "
            "BenchConfig(model='hf:llama-3.2-1b', overrides={'num_hidden_layers': 2, 'seq_len': 64}); "
            "print('transformers' in sys.modules, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False False", out.stderr


def test_an_hf_name_travels_in_a_link_and_a_module_still_does_not():
    config = BenchConfig(model="hf:gpt2", overrides={"n_layer": 2})
    link = params.to_query_params(config)
    assert link["model"] == "hf:gpt2" and link["n_layer"] == "2"
    settings, warnings = params.parse_query_params(link)
    assert not warnings and BenchConfig(**settings) == config
    settings, warnings = params.parse_query_params({"model": "os:system"})
    assert "model" not in settings and warnings


def test_the_model_picker_lists_the_table_beside_the_presets():
    assert presets.MODELS[:len(presets.PRESETS)] == tuple(presets.PRESETS)
    assert set(hf_table.hf_names()) <= set(presets.MODELS)
    assert not presets.is_user_model("hf:gpt2") and presets.is_user_model("mypkg.models:build")
    # Every --set key of every architecture is a link parameter.
    assert {key for name in hf_table.hf_names() for key in hf_table.dims(name)} <= set(presets.dimension_names())


def test_a_link_opens_the_run_page_on_an_hf_model_with_its_own_dimension_keys(app_db):
    at = open_app(query={"model": "hf:gpt2", "n_layer": "2", "seq_len": "64"})
    picker = at.selectbox(key="config.model")
    assert picker.value == "hf:gpt2" and set(hf_table.hf_names()) <= set(picker.options)
    assert at.number_input(key=form.dim_key("hf:gpt2", "n_layer")).value == 2
    assert at.number_input(key=form.dim_key("hf:gpt2", "seq_len")).value == 64
    assert at.number_input(key=form.dim_key("hf:gpt2", "n_embd")).value == 768
    assert not at.error and not at.warning, [e.value for e in [*at.error, *at.warning]]
