#!/usr/bin/env python
"""What dcq-train's bad-step guard costs: the training step with ``--validate off`` and
``--validate async``, each with the fused optimizer (dcq-train's, which skips a bad
update through its ``found_inf``) and with the foreach optimizer (whose guard copies
the parameters and the optimizer state before each step), side by side in one process.

    python benchmarks/guard_cost.py                      # iresnet18, 32x32, batch 32, 1 thread
    python benchmarks/guard_cost.py --blocks 8 --steps 4 --threads 2

Two trainers (the fused optimizer and the foreach one) each run their variants, the
guard switched on and off between blocks of ``--steps`` steps on the same trainer
(two trainers of one configuration differ by a few percent by themselves); the
variants run in rotating blocks (the order rotates each block), so that the load of a
shared machine falls on all of them alike; ``off-again`` is the control (the same
unguarded step once more: its ratio to ``off`` is the measurement's own floor). Each
block is timed in wall time and in this process's CPU time (``time.process_time``: at
one thread, the work itself, whatever else the machine runs). A step is what
dcq-train's loop does: the next batch of the data, forward, backward, the guard, the
update, the generator's EMA; each block ends with the host read a log line makes.
The ratios are reported per block (median, range) and as a geometric mean with its
95% interval.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dcq_ops import DCQLoss  # noqa: E402
from dcq_ops.training import TrainConfig, Trainer  # noqa: E402
from dcq_ops.training.data import batch_loader  # noqa: E402
from dcq_ops.training.step_guard import StepGuard  # noqa: E402

VARIANTS = ("off", "async", "off-foreach", "async-foreach+copy", "off-again")
# Each variant is (trainer, validation): one trainer with dcq-train's fused optimizer and
# one with the foreach optimizer, each switched between its guard and none from block to
# block. Two trainers of one configuration differ by several percent in this measurement
# by themselves (allocation, cache placement: 1.047 between two unguarded instances in one
# run), which would swamp a guard of a few percent; on one trainer that difference is gone.
# "off-again" is the control: the fused trainer unguarded once more in every block; its
# ratio to "off" is the floor under which a guard's cost cannot be read.
SETUPS = {"off": ("fused", "off"), "async": ("fused", "async"), "off-foreach": ("foreach", "off"),
          "async-foreach+copy": ("foreach", "async"), "off-again": ("fused", "off")}
PAIRS = (("async", "off"), ("async-foreach+copy", "off-foreach"), ("off-again", "off"))


def build(optimizer: str, args) -> Trainer:
    """A trainer guarded as dcq-train's (validate="async"), with its unguarded twin guard."""
    trainer = Trainer(TrainConfig(backbone=args.backbone, image_size=args.image_size, batch_size=args.batch_size,
                                  steps=10 ** 6, progress="none", threads=args.threads, validate="async"))
    if optimizer == "foreach":  # the optimizer without found_inf: the guard falls back to the full copy
        for group in trainer.optimizer.param_groups:
            group["fused"] = False
    guard = trainer.guard
    trainer.guards = {"async": guard,
                      "off": StepGuard(trainer._undoable, validate="off", max_bad_steps=guard.max_bad_steps,
                                       grads_checked=guard.grads_checked, device=guard.device,
                                       world_size=guard.world_size, optimizer=trainer.optimizer)}
    return trainer


def endless_batches(trainer: Trainer):
    """The trainer's batches, epoch after epoch (a long run outlasts one epoch)."""
    epoch = 0
    while True:
        yield from batch_loader(trainer.dataset, trainer.sampler, epoch)
        epoch += 1


def set_validation(trainer: Trainer, mode: str) -> None:
    """What --validate ``mode`` changes in a trainer: its step guard and DCQLoss's own checks."""
    trainer.guard = trainer.guards[mode]
    for module in trainer.head.modules():
        if isinstance(module, DCQLoss):
            module.validate = mode


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="iresnet18")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--blocks", type=int, default=8)
    parser.add_argument("--steps", type=int, default=4, help="steps per block")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"comma-separated subset of {', '.join(VARIANTS)} (default: all)")
    args = parser.parse_args(argv)
    variants = tuple(v.strip() for v in args.variants.split(",") if v.strip())
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown or not variants:
        parser.error(f"--variants: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(VARIANTS)}")
    if args.blocks < 1 or args.steps < 1:
        parser.error(f"--blocks and --steps must be at least 1, got {args.blocks} and {args.steps}")
    trainers = {name: build(name, args) for name in dict.fromkeys(SETUPS[v][0] for v in variants)}
    batches = {name: endless_batches(t) for name, t in trainers.items()}

    def block(variant: str, steps: int) -> tuple[float, float]:
        name, mode = SETUPS[variant]
        trainer = trainers[name]
        set_validation(trainer, mode)
        wall, cpu = time.perf_counter(), time.process_time()
        for _ in range(steps):
            loss, _ = trainer.train_step(next(batches[name]))
        float(loss)  # the host read of a log line
        trainer.guard.read(_Quiet(), _Quiet(), trainer.step, trainer.steps_per_epoch)
        samples = steps * args.batch_size
        return samples / (time.perf_counter() - wall), samples / (time.process_time() - cpu)

    for v in variants:
        block(v, 2)  # warm-up
    wall = {v: [] for v in variants}
    cpu = {v: [] for v in variants}
    for b in range(args.blocks):
        shift = b % len(variants)
        for v in variants[shift:] + variants[:shift]:
            w, c = block(v, args.steps)
            wall[v].append(w)
            cpu[v].append(c)
        print(f"block {b}: " + "  ".join(f"{v} {wall[v][-1]:.1f}/s ({cpu[v][-1]:.1f} per CPU-s)" for v in variants),
              flush=True)
    result = {}
    for title, table in (("samples/s (wall)", wall), ("samples per CPU-second", cpu)):
        print(title)
        for v in variants:
            xs = table[v]
            print(f"  {v:20s} min {min(xs):7.2f}  median {statistics.median(xs):7.2f}  max {max(xs):7.2f}")
        for guarded, plain in PAIRS:
            if guarded not in table or plain not in table:
                continue
            ratios = [g / p for g, p in zip(table[guarded], table[plain])]
            result[(title, guarded)] = ratios
            low, high = mean_ratio_interval(ratios)
            print(f"  {guarded}/{plain} per block: min {min(ratios):.3f}  median {statistics.median(ratios):.3f}  "
                  f"max {max(ratios):.3f}  geometric mean {math.exp(statistics.fmean(map(math.log, ratios))):.3f} "
                  f"(95% interval {low:.3f}-{high:.3f})")
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)")
    return result


def mean_ratio_interval(ratios: list[float]) -> tuple[float, float]:
    """A 95% interval of the geometric mean of per-block ratios (Student's t on their
    logarithms; the blocks are paired and rotated, so each ratio is one observation)."""
    if len(ratios) < 2:
        return (math.nan, math.nan)
    logs = [math.log(r) for r in ratios]
    half = _T95.get(len(logs) - 1, 1.96) * statistics.stdev(logs) / math.sqrt(len(logs))
    mean = statistics.fmean(logs)
    return math.exp(mean - half), math.exp(mean + half)


# Two-sided 95% quantiles of Student's t by degrees of freedom (above 30: the normal's).
_T95 = {1: 12.71, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093,
        20: 2.086, 21: 2.080, 22: 2.074, 23: 2.069, 24: 2.064, 25: 2.060, 26: 2.056, 27: 2.052, 28: 2.048,
        29: 2.045, 30: 2.042}


class _Quiet:
    """A progress output and a log that drop what the guard reports."""

    def message(self, text):
        pass

    def write(self, record):
        pass


if __name__ == "__main__":
    main()
