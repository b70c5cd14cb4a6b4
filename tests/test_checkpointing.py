"""Checkpointing policies: same gradients, more hardware FLOPs, less activation memory."""
import pytest
import torch
import torch.nn as nn

from engine import checkpointing, flops, memory, models
from engine.checkpointing import CheckpointedBlock, make_policy
from tests.test_step import TINY, make_step, step_grads

MEMORY_DIMS = {"n_layers": 4, "seq_len": 64, "d_model": 64, "n_heads": 2, "vocab": 256}


@pytest.mark.parametrize("ckpt", ["full", "every-k", "selective"])
def test_same_gradients_and_hardware_flops_only_for_what_is_recomputed(ckpt):
    baseline = make_step(batch=4, ckpt="none")
    checkpointed = make_step(batch=4, ckpt=ckpt)
    for a, b in zip(baseline.model.parameters(), checkpointed.model.parameters()):
        assert torch.equal(a, b)
    checkpointed.batches = baseline.batches
    for g_none, g_ckpt in zip(step_grads(baseline), step_grads(checkpointed)):
        torch.testing.assert_close(g_ckpt, g_none)

    model_none, hw_none = flops.count_flops(baseline)
    model_ckpt, hw_ckpt = flops.count_flops(checkpointed)
    assert model_none == hw_none  # nothing recomputed without checkpointing
    assert model_ckpt == model_none  # the model's work does not change
    if ckpt == "selective":
        assert hw_ckpt == hw_none  # matmuls and attention are saved: only pointwise ops (no FLOPs) run again
    else:
        assert hw_ckpt > hw_none  # the recompute is counted as hardware FLOPs


def test_recompute_flops_match_what_each_policy_recomputes():
    B, T, C, L = 4, TINY["seq_len"], TINY["d_model"], TINY["n_layers"]
    # Non-reentrant checkpointing stops recomputing once backward has what it needs, so a
    # block's last matmul (fc_proj, 4*C*C) never runs again: qkv + proj + fc = 8*C*C.
    block_forward = 2 * B * T * 8 * C * C + 4 * B * T * T * C  # linear layers + attention core
    extra = {}
    for ckpt in ("full", "every-k", "selective"):
        model_flops, hw_flops = flops.count_flops(make_step(batch=B, ckpt=ckpt))
        extra[ckpt] = hw_flops - model_flops
    assert extra["full"] == L * block_forward
    assert extra["every-k"] == (L // 2) * block_forward  # k = 2: blocks 0, 2, ...
    # selective keeps the matmul and attention outputs: what runs again (LayerNorm, GELU,
    # adds) has no FLOPs in the counter's convention
    assert extra["selective"] == 0


def test_activation_memory_full_much_less_and_bf16_less():
    def activations(ckpt, precision):
        step = make_step(batch=4, ckpt=ckpt, precision=precision, overrides=MEMORY_DIMS)
        step.run()  # optimizer state exists, as after warm-up
        return memory.memory_breakdown(step).activations

    none_fp32 = activations("none", "fp32")
    assert activations("full", "fp32") < 0.5 * none_fp32
    assert activations("none", "bf16") < 0.8 * none_fp32


def test_policies_wrap_the_right_blocks():
    def wrapped(ckpt, k=2):
        torch.manual_seed(0)
        model, _ = models.build("gpt-tiny", {**TINY, "n_layers": 5})
        make_policy(ckpt, k).apply(model)
        return [isinstance(block, CheckpointedBlock) for block in model.blocks]

    assert wrapped("none") == [False] * 5
    assert wrapped("full") == [True] * 5
    assert wrapped("every-k", 2) == [True, False, True, False, True]
    assert wrapped("every-k", 3) == [True, False, False, True, False]
    assert wrapped("selective") == [True] * 5


def test_wrapping_keeps_parameter_order():
    torch.manual_seed(0)
    plain, _ = models.build("gpt-tiny", TINY)
    torch.manual_seed(0)
    wrapped, _ = models.build("gpt-tiny", TINY)
    make_policy("full").apply(wrapped)
    assert [p.shape for p in plain.parameters()] == [p.shape for p in wrapped.parameters()]


def test_unknown_policy_and_model_without_blocks():
    with pytest.raises(ValueError, match="selective"):
        make_policy("sometimes")
    flat = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
    with pytest.raises(ValueError, match="found no blocks"):
        make_policy("full").apply(flat)  # single layers are no blocks: wrapping one keeps its input anyway
    with pytest.raises(ValueError, match="matching --blocks 'layer9.*'"):
        make_policy("full").apply(flat, "layer9.*")
    assert make_policy("none").apply(flat) is None and isinstance(flat[0], nn.Linear)


@pytest.mark.parametrize("op", ["_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
                                "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu"])
def test_selective_saves_every_attention_kernel_so_attention_never_runs_again(op):
    # The CUDA kernels never run on this machine: the policy's decision for each is checked.
    policy = checkpointing._save_expensive_outputs
    assert policy(None, getattr(torch.ops.aten, op).default) == torch.utils.checkpoint.CheckpointPolicy.MUST_SAVE


def test_selective_saves_matmuls_and_recomputes_the_rest():
    policy = checkpointing._save_expensive_outputs
    aten = torch.ops.aten
    assert policy(None, aten.mm.default) == torch.utils.checkpoint.CheckpointPolicy.MUST_SAVE
    assert policy(None, aten.addmm.default) == torch.utils.checkpoint.CheckpointPolicy.MUST_SAVE
    assert policy(None, aten.gelu.default) == torch.utils.checkpoint.CheckpointPolicy.PREFER_RECOMPUTE
