"""FLOPs per optimizer step and model FLOPs utilisation (MFU).

FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode`` over one real training
step (matmuls, convolutions and attention; pointwise ops are not counted, as in every
MFU convention). Hardware FLOPs are everything that ran, checkpoint recompute included;
model FLOPs are the same count minus what ran inside recompute, i.e. what the model needs
without checkpointing (the PaLM definition of MFU, Chowdhery et al. 2022, appendix B).
One difference from PaLM's closed form: FlopCounterMode counts the attention backward as
the flash kernels run it, with the T×T scores recomputed (14·B·T²·C per layer instead of
12), which adds about 2% to a GPT-2-small step at T = 1024.

MFU = model FLOPs per second / the device's dense peak for the precision, from
``PEAK_TFLOPS`` (one row per device, every figure with its source). A device or precision
without a row gives ``None``: never a guess.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from . import checkpointing


@dataclass(frozen=True)
class PeakRow:
    """Dense (no 2:4 sparsity) peak TFLOP/s of one device, per precision, with its source.

    ``precision`` keys: ``bf16``/``fp16`` (tensor cores, FP32 accumulate), ``tf32`` (tensor
    cores), ``fp32`` (CUDA cores, no tensor cores).
    """

    pattern: str
    device: str
    tflops: dict
    source: str


_H100_WHITEPAPER = "NVIDIA H100 Tensor Core GPU Architecture whitepaper (2022), table 'H100 SXM5 / H100 PCIe' peak TFLOPS (dense figures; sparse ones are 2x)"
_H100_DATASHEET = "NVIDIA H100 datasheet, https://www.nvidia.com/en-us/data-center/h100/ (H100 NVL column; sparse figures halved)"
_H200_DATASHEET = "NVIDIA H200 datasheet, https://www.nvidia.com/en-us/data-center/h200/ (sparse figures halved; same GH100 SXM clocks as H100 SXM5)"

# Order matters: the first row whose pattern matches the device name wins, so specific
# variants (NVL, PCIe) come before the generic name. \b keeps "GH200" out of "H200" and
# "L40S" out of "L4". GH200, H800, H20 and RTX 5090 have no row: no datasheet figure was
# verified for them, so their MFU is None rather than borrowed from a sibling.
PEAK_TFLOPS: tuple[PeakRow, ...] = (
    PeakRow(r"\bH100\b.*\bNVL\b", "H100 NVL", {"bf16": 835.5, "fp16": 835.5, "tf32": 417.5, "fp32": 60.0}, _H100_DATASHEET),
    PeakRow(r"\bH100\b.*\bPCIe\b", "H100 PCIe", {"bf16": 756.0, "fp16": 756.0, "tf32": 378.0, "fp32": 51.2}, _H100_WHITEPAPER),
    PeakRow(r"\bH100\b", "H100 SXM5", {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9}, _H100_WHITEPAPER),
    PeakRow(r"\bH200\b.*\bNVL\b", "H200 NVL", {"bf16": 835.5, "fp16": 835.5, "tf32": 417.5, "fp32": 60.0}, _H200_DATASHEET),
    PeakRow(r"\bH200\b", "H200 SXM", {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9}, _H200_DATASHEET),
    PeakRow(
        r"\bA100\b",
        "A100 (SXM4 and PCIe, 40/80 GB)",
        {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5},
        "NVIDIA A100 datasheet, https://www.nvidia.com/en-us/data-center/a100/ (sparse figures halved)",
    ),
    PeakRow(
        r"\bL40S\b",
        "L40S",
        {"bf16": 362.05, "fp16": 362.05, "tf32": 183.0, "fp32": 91.6},
        "NVIDIA L40S datasheet, https://www.nvidia.com/en-us/data-center/l40s/ (sparse figures halved)",
    ),
    # GeForce cards accumulate fp16/bf16 in fp32 at half rate; autocast's GEMMs accumulate in fp32.
    PeakRow(
        r"\bRTX 4090\b",
        "GeForce RTX 4090",
        {"bf16": 165.2, "fp16": 165.2, "tf32": 82.6, "fp32": 82.6},
        "NVIDIA Ada Lovelace GPU architecture whitepaper v1.0 (2022), appendix table A: RTX 4090 peak "
        "FP16/BF16 Tensor TFLOPS with FP32 accumulate, dense",
    ),
    PeakRow(
        r"\bB200\b",
        "B200 (HGX, 1000 W)",
        {"bf16": 2250.0, "fp16": 2250.0, "tf32": 1100.0, "fp32": 75.0},
        "NVIDIA HGX B200 specifications, https://www.nvidia.com/en-us/data-center/hgx/ (per GPU; sparse figures halved)",
    ),
    PeakRow(
        r"\bL4\b",
        "L4",
        {"bf16": 121.0, "fp16": 121.0, "tf32": 60.0, "fp32": 30.3},
        "NVIDIA L4 datasheet, https://www.nvidia.com/en-us/data-center/l4/ (sparse figures halved)",
    ),
    # Volta has no bf16 or tf32 tensor cores: no row for those precisions.
    PeakRow(
        r"\bV100S\b",
        "V100S PCIe",
        {"fp16": 130.0, "fp32": 16.4},
        "NVIDIA V100 datasheet, https://www.nvidia.com/en-us/data-center/v100/",
    ),
    PeakRow(
        r"\bV100\b.*\bPCIE\b",
        "V100 PCIe",
        {"fp16": 112.0, "fp32": 14.0},
        "NVIDIA V100 datasheet, https://www.nvidia.com/en-us/data-center/v100/",
    ),
    PeakRow(
        r"\bV100\b",
        "V100 SXM2",
        {"fp16": 125.0, "fp32": 15.7},
        "NVIDIA V100 datasheet, https://www.nvidia.com/en-us/data-center/v100/",
    ),
)


def peak_row(device_name: str) -> PeakRow | None:
    """The table row for a device name (e.g. ``torch.cuda.get_device_name()``), or None.

    None for a MIG instance ("... MIG 1g.10gb"): it has a fraction of the GPU's SMs, and no
    datasheet gives its peak, so the whole GPU's row would understate MFU several times over.
    """
    if re.search(r"\bMIG\b", device_name, flags=re.IGNORECASE):
        return None
    for row in PEAK_TFLOPS:
        if re.search(row.pattern, device_name, flags=re.IGNORECASE):
            return row
    return None


def peak_tflops(device_name: str, precision: str, tf32: bool | None = False) -> float | None:
    """Dense peak TFLOP/s for a config precision on a device, or None if not in the table.

    For ``fp32`` the matmuls run on TF32 tensor cores only when TF32 is enabled, so
    ``tf32`` picks that figure; ``tf32=None`` (mixed: see ``fp32_uses_tf32``) gives None.
    """
    row = peak_row(device_name)
    if row is None:
        return None
    if precision == "fp32":
        if tf32 is None:
            return None
        key = "tf32" if tf32 else "fp32"
    else:
        key = precision
    return row.tflops.get(key)


def _tf32_on(api, legacy_flag: Callable[[], bool]) -> bool:
    """Whether TF32 is on for one kind of op. Where torch has the ``fp32_precision`` API it is
    the one to read: it already falls back op -> backend -> global, and reading the legacy
    ``allow_tf32`` flag after the new API was used raises ("mix of the legacy and new
    APIs"). Older torch: the legacy flag."""
    precision = getattr(api, "fp32_precision", None)
    return precision == "tf32" if precision is not None else bool(legacy_flag())


def fp32_uses_tf32(model: nn.Module) -> bool | None:
    """Whether an fp32 step of ``model`` runs on TF32 tensor cores on CUDA.

    Matmuls follow the cuBLAS setting (off by default), convolutions cuDNN's conv setting
    (on by default). A model with both kinds of layer under different settings has no
    single peak: None.
    """
    matmul = _tf32_on(torch.backends.cuda.matmul, lambda: torch.backends.cuda.matmul.allow_tf32)
    has_conv = any(isinstance(m, nn.modules.conv._ConvNd) for m in model.modules())
    conv = _tf32_on(getattr(torch.backends.cudnn, "conv", None), lambda: torch.backends.cudnn.allow_tf32)
    if not has_conv or conv == matmul:
        return matmul
    return None


def mfu(model_flops: float | None, step_s: float, device_name: str, precision: str, tf32: bool | None = False) -> float | None:
    """Model FLOPs per second over the device's peak (0..1), or None when unknown."""
    peak = peak_tflops(device_name, precision, tf32)
    if peak is None or not model_flops or step_s <= 0:
        return None
    return model_flops / step_s / (peak * 1e12)


# FlopCounterMode has formulas for the CUDA attention kernels but not for the CPU flash
# kernel that F.scaled_dot_product_attention uses on CPU; same maths, same formulas.
def _cpu_sdpa_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


def _cpu_sdpa_backward_flops(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out, query, key, value)


def _extra_formulas() -> dict:
    aten = torch.ops.aten
    formulas = {}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        formulas[aten._scaled_dot_product_flash_attention_for_cpu] = _cpu_sdpa_flops
        formulas[aten._scaled_dot_product_flash_attention_for_cpu_backward] = _cpu_sdpa_backward_flops
    return formulas


def flop_counter() -> FlopCounterMode:
    """A silent ``FlopCounterMode`` that also knows the CPU attention kernel."""
    return FlopCounterMode(display=False, custom_mapping=_extra_formulas())


def count_flops(step) -> tuple[int, int]:
    """``(model_flops, hw_flops)`` for one optimizer step (all micro-batches) of ``step``.

    Runs one real step (it updates the weights), so call it after timing. Recompute is
    counted by a second counter that is active only inside checkpoint recomputation
    (underneath selective checkpointing's cache, so cached matmuls are not counted as
    recomputed): model = hardware - recompute.
    """
    recompute_counters: list[FlopCounterMode] = []

    def recompute_counter() -> FlopCounterMode:
        counter = flop_counter()
        recompute_counters.append(counter)
        return counter

    with checkpointing.observe_recompute(step.model, recompute_counter), flop_counter() as total:
        step.run()
    hw_flops = int(total.get_total_flops())
    recompute = sum(int(c.get_total_flops()) for c in recompute_counters)
    return hw_flops - recompute, hw_flops
