#!/usr/bin/env python
"""What dcq-train's bad-step guard costs: the training step with ``--validate off`` and
``--validate async``, each with the fused optimizer (dcq-train's, which skips a bad
update through its ``found_inf``) and with the foreach optimizer (whose guard copies
the parameters and the optimizer state before each step), side by side in one process.

    python benchmarks/guard_cost.py                      # iresnet18, 32x32, batch 32, 1 thread
    python benchmarks/guard_cost.py --blocks 8 --steps 4 --threads 2

The four variants run in rotating blocks of ``--steps`` steps (the order rotates each
block), so that the load of a shared machine falls on all of them alike; each block is
timed in wall time and in this process's CPU time (``time.process_time``: at one thread,
the work itself, whatever else the machine runs). A step is what dcq-train's loop does:
the next batch of the data, forward, backward, the guard, the update, the generator's
EMA; each block ends with the host read a log line makes.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dcq_ops.training import TrainConfig, Trainer  # noqa: E402
from dcq_ops.training.data import batch_loader  # noqa: E402

VARIANTS = ("off", "async", "off-foreach", "async-foreach+copy")


def build(variant: str, args) -> Trainer:
    trainer = Trainer(TrainConfig(backbone=args.backbone, image_size=args.image_size, batch_size=args.batch_size,
                                  steps=10 ** 6, progress="none", threads=args.threads,
                                  validate="off" if variant.startswith("off") else "async"))
    if "foreach" in variant:  # the optimizer without found_inf: the guard falls back to the full copy
        for group in trainer.optimizer.param_groups:
            group["fused"] = False
    return trainer


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="iresnet18")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--blocks", type=int, default=8)
    parser.add_argument("--steps", type=int, default=4, help="steps per block")
    args = parser.parse_args(argv)
    trainers = {v: build(v, args) for v in VARIANTS}
    batches = {v: batch_loader(t.dataset, t.sampler, 0) for v, t in trainers.items()}

    def block(variant: str, steps: int) -> tuple[float, float]:
        trainer = trainers[variant]
        wall, cpu = time.perf_counter(), time.process_time()
        for _ in range(steps):
            loss, _ = trainer.train_step(next(batches[variant]))
        float(loss)  # the host read of a log line
        trainer.guard.read(_Quiet(), _Quiet(), trainer.step, trainer.steps_per_epoch)
        samples = steps * args.batch_size
        return samples / (time.perf_counter() - wall), samples / (time.process_time() - cpu)

    for v in VARIANTS:
        block(v, 2)  # warm-up
    wall = {v: [] for v in VARIANTS}
    cpu = {v: [] for v in VARIANTS}
    for b in range(args.blocks):
        for v in VARIANTS[b % 4:] + VARIANTS[:b % 4]:
            w, c = block(v, args.steps)
            wall[v].append(w)
            cpu[v].append(c)
        print(f"block {b}: " + "  ".join(f"{v} {wall[v][-1]:.1f}/s ({cpu[v][-1]:.1f} per CPU-s)" for v in VARIANTS),
              flush=True)
    result = {}
    for title, table in (("samples/s (wall)", wall), ("samples per CPU-second", cpu)):
        print(title)
        for v in VARIANTS:
            xs = table[v]
            print(f"  {v:20s} min {min(xs):7.2f}  median {statistics.median(xs):7.2f}  max {max(xs):7.2f}")
        for guarded, plain in (("async", "off"), ("async-foreach+copy", "off-foreach")):
            ratios = [g / p for g, p in zip(table[guarded], table[plain])]
            result[(title, guarded)] = ratios
            print(f"  {guarded}/{plain} per block: min {min(ratios):.3f}  median {statistics.median(ratios):.3f}  "
                  f"max {max(ratios):.3f}")
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)")
    return result


class _Quiet:
    """A progress output and a log that drop what the guard reports."""

    def message(self, text):
        pass

    def write(self, record):
        pass


if __name__ == "__main__":
    main()
