"""MFU of gpt-small and gpt-medium in bf16 at a batch that fills the GPU.

Eager PyTorch (no torch.compile), SDPA attention, fused AdamW: the engine's own step. The
batch doubles from --start-batch while the next doubling can still fit (or until OOM); every
fitting batch is printed, then the best. Target: MFU >= 40% on H100/H200 (nanoGPT reports
37% for GPT-2 124M on an A100 with torch.compile). Without a CUDA GPU it says so and exits 0.

    python bench/mfu.py [--models gpt-small gpt-medium] [--start-batch 4] [--max-batch 256]
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine import BenchConfig, devices  # noqa: E402
from engine.config import GIB  # noqa: E402
from engine.flops import peak_row, peak_tflops  # noqa: E402
from engine.results import Metrics  # noqa: E402
from engine.worker import run  # noqa: E402

TARGET = 0.40


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["gpt-small", "gpt-medium"])
    parser.add_argument("--start-batch", type=int, default=4)
    parser.add_argument("--max-batch", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    return parser.parse_args(argv)


def sweep_model(model: str, args: argparse.Namespace, capacity: int) -> tuple[int, Metrics] | None:
    """Benchmark ``model`` at doubling batches, each in the engine's worker (through the device
    queue, so nothing else times the GPU meanwhile); return (batch, metrics) of the best-MFU
    batch. Any failure (out of memory of any kind, a crash, a timeout) ends the doubling."""
    best = None
    batch = args.start_batch
    while batch <= args.max_batch:
        config = BenchConfig(model=model, batch=batch, precision="bf16", warmup=args.warmup, steps=args.steps, device="cuda")
        result = run(config)
        if not result.ok:
            print(f"  {model} batch {batch:4d}: {result.status}: {(result.error or '')[:100]}")
            break
        metrics = result.metrics
        peak = metrics.peak_reserved_bytes
        mfu = metrics.mfu
        mfu_text = f"{mfu:6.1%}" if mfu is not None else "   n/a"
        print(
            f"  {model} batch {batch:4d}: step {metrics.step_ms.median:8.1f} ms "
            f"(IQR/median {metrics.step_ms.iqr_rel:.1%}), {metrics.tokens_per_s:10.0f} tokens/s, "
            f"MFU {mfu_text}, peak reserved {peak / GIB:6.1f} GiB, "
            f"{metrics.flops_per_step / metrics.step_ms.median / 1e9:7.1f} model TFLOP/s"
        )
        if best is None or (mfu or 0) > (best[1].mfu or 0):
            best = (batch, metrics)
        if 2 * peak > capacity:  # the next doubling cannot fit
            break
        batch *= 2
    return best


def main(argv=None) -> int:
    args = parse_args(argv)
    if devices.cuda_device_count() == 0:
        print("bench/mfu.py needs a CUDA GPU and none is present: nothing measured.")
        return 0
    gpu = devices.cuda_gpu("cuda")
    peak = peak_tflops(gpu.name, "bf16")
    print(f"device: {gpu.name} ({gpu.uuid}), {gpu.total_memory / GIB:.0f} GiB; bf16 dense peak {peak} TFLOP/s")
    if peak is None:
        why = "a MIG slice has no datasheet peak" if peak_row(gpu.name) is None and "MIG" in gpu.name else \
            "this device has no row in engine.flops.PEAK_TFLOPS"
        print(f"  ({why}: MFU is reported as n/a)")
    for model in args.models:
        best = sweep_model(model, args, gpu.total_memory)
        if best is None:
            print(f"{model}: no batch fits")
            continue
        batch, metrics = best
        mfu = metrics.mfu
        verdict = "" if mfu is None else (" OK" if mfu >= TARGET else f" below the {TARGET:.0%} target")
        mfu_text = f"{mfu:.1%}" if mfu is not None else "n/a"
        print(f"{model}: best MFU {mfu_text} at batch {batch} ({metrics.tokens_per_s:.0f} tokens/s){verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
