"""FLOP counting against the analytic transformer count, and the peak table / MFU."""
import pytest
import torch

from engine import flops, models
from tests.test_step import TINY, make_step


def analytic_gpt_flops(B, T, C, L, V):
    """Matmul FLOPs of one forward+backward of GPT: 6 * tokens * (linear weights) plus the
    attention core. FlopCounterMode's attention backward counts five T×T matmuls (the flash
    kernels recompute the scores), so the core is 4 + 10 = 14 * L * B * T^2 * C rather than
    PaLM's 12; causal masking is not discounted in either."""
    linear_weights = L * 12 * C * C + C * V  # qkv 3C², proj C², fc 4C², fc_proj 4C², tied head
    return 6 * B * T * linear_weights + 14 * L * B * T * T * C


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_model_flops_match_the_analytic_count(precision):
    B, accum = 4, 2
    model_flops, hw_flops = flops.count_flops(make_step(batch=B, accum=accum, precision=precision))
    expected = accum * analytic_gpt_flops(B, TINY["seq_len"], TINY["d_model"], TINY["n_layers"], TINY["vocab"])
    assert model_flops == hw_flops == expected


def test_cpu_attention_kernel_is_counted():
    # Without the extra formula the CPU flash-attention kernel counts as 0 FLOPs.
    q = torch.randn(2, 2, 16, 8, requires_grad=True)
    with flops.flop_counter() as counter:
        torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True).sum().backward()
    b, h, t, d = 2, 2, 16, 8
    assert counter.get_total_flops() == (4 + 10) * b * h * t * t * d  # forward 2 bmm, backward 5


@pytest.mark.parametrize(
    "name,precision,tf32,expected",
    [
        ("NVIDIA H100 80GB HBM3", "bf16", False, 989.4),
        ("NVIDIA H100 80GB HBM3", "fp16", False, 989.4),
        ("NVIDIA H100 80GB HBM3", "fp32", False, 66.9),
        ("NVIDIA H100 80GB HBM3", "fp32", True, 494.7),
        ("NVIDIA H100 PCIe", "bf16", False, 756.0),
        ("NVIDIA H100 NVL", "bf16", False, 835.5),
        ("NVIDIA H200", "bf16", False, 989.4),
        ("NVIDIA H200 NVL", "bf16", False, 835.5),
        ("NVIDIA A100-SXM4-80GB", "bf16", False, 312.0),
        ("NVIDIA A100-PCIE-40GB", "fp32", True, 156.0),
        ("NVIDIA A100-SXM4-40GB", "fp32", False, 19.5),
        ("NVIDIA L4", "bf16", False, 121.0),
        ("Tesla V100-SXM2-16GB", "fp16", False, 125.0),
        ("Tesla V100-PCIE-32GB", "fp16", False, 112.0),
        ("Tesla V100S-PCIE-32GB", "fp32", False, 16.4),
        ("NVIDIA L40S", "bf16", False, 362.05),
        ("NVIDIA L40S", "fp32", True, 183.0),
        ("NVIDIA GeForce RTX 4090", "bf16", False, 165.2),
        ("NVIDIA GeForce RTX 4090", "fp32", False, 82.6),
        ("NVIDIA B200", "bf16", False, 2250.0),
        # no row, or no figure for that precision: unknown, never a guess
        ("Tesla V100-SXM2-16GB", "bf16", False, None),
        ("NVIDIA GH200 480GB", "bf16", False, None),
        ("NVIDIA H800", "bf16", False, None),
        ("NVIDIA H20", "bf16", False, None),
        ("NVIDIA GeForce RTX 5090", "bf16", False, None),
        # a MIG slice has a fraction of the GPU's SMs: the whole GPU's peak would be wrong
        ("NVIDIA H100 80GB HBM3 MIG 1g.10gb", "bf16", False, None),
        ("NVIDIA A100-SXM4-40GB MIG 3g.20gb", "bf16", False, None),
        ("AMD EPYC 7763", "fp32", False, None),
        ("NVIDIA H100 80GB HBM3", "fp32", None, None),
    ],
)
def test_peak_table(name, precision, tf32, expected):
    assert flops.peak_tflops(name, precision, tf32) == expected


def test_every_row_cites_a_source():
    for row in flops.PEAK_TFLOPS:
        assert "NVIDIA" in row.source and len(row.source) > 20
        assert set(row.tflops) <= {"bf16", "fp16", "tf32", "fp32"}
        assert all(v > 0 for v in row.tflops.values())


def test_mfu_arithmetic_and_unknowns():
    assert flops.mfu(989.4e12, 1.0, "NVIDIA H100 80GB HBM3", "bf16") == pytest.approx(1.0)
    assert flops.mfu(312e12, 2.0, "NVIDIA A100-SXM4-40GB", "bf16") == pytest.approx(0.5)
    assert flops.mfu(1e12, 1.0, "AMD EPYC 7763", "bf16") is None
    assert flops.mfu(None, 1.0, "NVIDIA H100 80GB HBM3", "bf16") is None


def test_fp32_tf32_decision():
    gpt, _ = models.build("gpt-tiny", TINY)
    cnn, _ = models.build("cnn", {"image_size": 8, "width": 4, "depth": 1})
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = False, True
        assert flops.fp32_uses_tf32(gpt) is False
        assert flops.fp32_uses_tf32(cnn) is None  # convs on TF32, matmuls not: no single peak
        torch.backends.cuda.matmul.allow_tf32 = True
        assert flops.fp32_uses_tf32(gpt) is True and flops.fp32_uses_tf32(cnn) is True
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


def build_tf32_model():
    """A user model that enables TF32 the way torch recommends (the fp32_precision API)."""
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    model, make_batch = models.build("gpt-tiny", TINY)
    return model, make_batch


def test_tf32_is_read_through_the_new_api_without_mixing_apis():
    gpt, _ = models.build("gpt-tiny", TINY)
    try:
        torch.backends.cuda.matmul.fp32_precision = "tf32"
        with pytest.raises(RuntimeError, match="mix of the legacy and new APIs"):
            torch.backends.cuda.matmul.allow_tf32  # what the old reading did: it raised
        assert flops.fp32_uses_tf32(gpt) is True
        torch.backends.cuda.matmul.fp32_precision = "ieee"
        assert flops.fp32_uses_tf32(gpt) is False
    finally:
        torch.backends.cuda.matmul.fp32_precision = "none"


def test_an_fp32_run_of_a_model_that_enables_tf32_the_new_way_is_ok():
    from engine import BenchConfig
    from engine.measure import run_benchmark

    try:
        result = run_benchmark(BenchConfig(model="tests.test_flops:build_tf32_model", batch=2, warmup=1, steps=2,
                                           device="cpu"))
    finally:
        torch.backends.cuda.matmul.fp32_precision = "none"
    assert result.status == "ok"
