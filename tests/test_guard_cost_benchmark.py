"""benchmarks/guard_cost.py: the guard switched on one trainer really changes the step it
times, the control runs, and bad arguments exit 2 (the measurement itself is in
docs/training.md, never asserted here)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import guard_cost  # noqa: E402

SMALL = ["--backbone", "iresnet18", "--image-size", "16", "--batch-size", "8", "--blocks", "2", "--steps", "1"]


def test_set_validation_switches_the_guard_and_the_loss_checks():
    import argparse

    args = argparse.Namespace(backbone="iresnet18", image_size=16, batch_size=8, threads=1)
    trainer = guard_cost.build("fused", args)
    from dcq_ops import DCQLoss

    losses = [m for m in trainer.head.modules() if isinstance(m, DCQLoss)]
    assert losses
    guard_cost.set_validation(trainer, "off")
    assert not trainer.guard.enabled and all(m.validate == "off" for m in losses)
    guard_cost.set_validation(trainer, "async")
    assert trainer.guard.enabled and all(m.validate == "async" for m in losses)


def test_a_short_run_reports_the_guard_and_the_control():
    result = guard_cost.main([*SMALL, "--variants", "off,async,off-again"])
    for title in ("samples/s (wall)", "samples per CPU-second"):
        assert len(result[(title, "async")]) == 2 and len(result[(title, "off-again")]) == 2


@pytest.mark.parametrize("bad", [["--variants", "off,nope"], ["--variants", ","], ["--blocks", "0"]])
def test_bad_arguments_exit_2(bad):
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "guard_cost.py"), *bad],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
