"""Harness overhead: the engine's median step time against a minimal hand-written loop.

Both run the same model, batch, accumulation, precision, checkpointing and optimizer in one
process, interleaved step by step (a hand-loop step runs in the engine's progress callback
after each of its measured steps), so drift (thermal, other load) hits both alike. Each
round builds fresh models for both sides. The hand loop times whole steps only (CUDA
events + one synchronisation per step on CUDA, perf_counter on CPU), so the ratio is what
the engine's per-phase timing and bookkeeping cost inside a step. Target: ratio <= 1.02.

    python bench/overhead.py --model gpt-tiny --batch 8 --device cpu
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from engine import BenchConfig, checkpointing, check_runnable, models  # noqa: E402
from engine.cli.common import add_config_flags, config_from_args  # noqa: E402
from engine.devicelock import device_queue  # noqa: E402
from engine.devices import device_key, env_info, resolve_device  # noqa: E402
from engine.step import on_device  # noqa: E402
from engine.measure import run_benchmark  # noqa: E402

TARGET = 1.02


class HandLoop:
    """The plainest correct training loop for ``config``: no engine code inside a step."""

    def __init__(self, config: BenchConfig, device: torch.device):
        self.config, self.device = config, device
        torch.manual_seed(config.seed)
        with device:
            model, make_batch = models.build(config.model, config.overrides)
        self.model = checkpointing.make_policy(config.ckpt, config.k).apply(model.to(device))
        impl = {"fused": True} if device.type == "cuda" else {"foreach": True}
        if config.optimizer == "adamw":
            self.opt = torch.optim.AdamW(self.model.parameters(), lr=3e-4, weight_decay=0.1, **impl)
        else:
            self.opt = torch.optim.SGD(self.model.parameters(), lr=1e-2, momentum=0.9, **impl)
        self.dtype = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}[config.precision]
        self.scaler = torch.amp.GradScaler(device.type) if config.precision == "fp16" else None
        self.batches = [make_batch(config.batch, device) for _ in range(config.accum)]
        for _ in range(config.warmup):
            self.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            self.start, self.end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def step(self) -> None:
        for batch in self.batches:
            with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None):
                loss = self.model(*batch) / self.config.accum
            if self.scaler is not None:
                self.scaler.scale(loss).backward()
            else:
                loss.backward()
        if self.scaler is not None:
            self.scaler.unscale_(self.opt)
            self.scaler.step(self.opt)
            self.scaler.update()
        else:
            self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def timed_step_ms(self) -> float:
        """One step's time: CUDA events and one synchronisation on CUDA, perf_counter on CPU."""
        if self.device.type == "cuda":
            self.start.record(torch.cuda.current_stream(self.device))
            self.step()
            self.end.record(torch.cuda.current_stream(self.device))
            self.end.synchronize()
            return self.start.elapsed_time(self.end)
        t0 = time.perf_counter()
        self.step()
        return (time.perf_counter() - t0) * 1000.0


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_config_flags(parser)  # the engine's own flags: --steps is measured steps per round and side
    parser.set_defaults(warmup="5", steps="20")
    parser.add_argument("--rounds", type=int, default=3, help="rounds, each with fresh models")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    config = config_from_args(args)
    check_runnable(config)
    # In the device queue like every run, and with the target GPU current: its kernels and
    # both sides' events go to its stream.
    with device_queue(device_key(config.device)), on_device(torch.device(resolve_device(config.device))):
        return _compare(config, args)


def _compare(config: BenchConfig, args: argparse.Namespace) -> int:
    device = torch.device(resolve_device(config.device))
    env = env_info(str(device))
    print(f"device: {env['device_name']} ({device}), torch {env['torch']}, cuda {env['cuda']}, threads {torch.get_num_threads()}")
    print(f"config: {config.describe()}; {args.rounds} rounds x {config.steps} steps (warm-up {config.warmup})")
    engine_ms: list[float] = []
    hand_ms: list[float] = []
    for round_index in range(args.rounds):
        hand = HandLoop(config, device)

        def after_engine_step(event) -> None:
            # Called by the engine right after each measured step has been timed: one
            # hand-loop step here interleaves the two step by step, so load drift on the
            # machine hits both sides alike.
            if event.phase == "measure":
                hand_ms.append(hand.timed_step_ms())

        engine_ms += run_benchmark(config, after_engine_step).samples["step_ms"]
        del hand
        print(f"  round {round_index + 1}: engine {statistics.median(engine_ms):.3f} ms, "
              f"hand loop {statistics.median(hand_ms):.3f} ms (medians so far)")
    engine, hand = statistics.median(engine_ms), statistics.median(hand_ms)
    ratio = engine / hand
    verdict = "OK" if ratio <= TARGET else "ABOVE TARGET"
    print(f"median step: engine {engine:.3f} ms, hand loop {hand:.3f} ms")
    print(f"ratio engine/hand = {ratio:.4f} (target <= {TARGET}): {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
