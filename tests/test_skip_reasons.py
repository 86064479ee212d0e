"""Which rank's step was bad, and why (issue 28 item 14): each rank's mask of what is
wrong travels in the flag the ranks already all-reduce, so the skip log of every rank
names the rank and the reason, with no collective or host read added."""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dcq_ops.training.skip_reasons import (CLASS_WEIGHTS, EMBEDDINGS, GRADIENTS, LOSS, batch_problem, describe_step,
                                           step_flags)

REPO = Path(__file__).resolve().parent.parent


def test_one_process_masks_and_their_words():
    g = torch.Generator().manual_seed(0)
    embeddings, weights = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g)
    assert step_flags(torch.tensor(1.0), embeddings, weights, torch.tensor(True), 1).tolist() == [0]
    weights[2, 1] = math.inf
    flags = step_flags(torch.tensor(math.nan), embeddings, weights, torch.tensor(False), 1)
    assert flags.tolist() == [LOSS | CLASS_WEIGHTS | GRADIENTS]
    assert describe_step(flags.tolist()) == "NaN or infinite values in the loss, the class weights and the gradients"
    assert describe_step([0, EMBEDDINGS, 0]) == "rank 1: NaN or infinite values in the embeddings"
    assert describe_step([LOSS, 0, CLASS_WEIGHTS]) == ("rank 0: NaN or infinite values in the loss; rank 2: NaN or "
                                                       "infinite values in the class weights")
    assert "the gradients" not in describe_step([0], grads_checked=False)
    assert batch_problem(embeddings, torch.tensor([0, 1, 2, 3]), weights, 10, 1) == (
        "DCQLoss would reject the batch of rank 0 (NaN or infinite values in class_weights (class_weights must be "
        "finite))")
    assert batch_problem(embeddings, torch.tensor([0, 1, 2, 3]), torch.randn(4, 3, generator=g), 10, 1) is None


LAUNCHER = """import sys
sys.path.insert(0, {repo!r})
import math
from dcq_ops.training import cli
from dcq_ops.training.trainer import Trainer

generate = Trainer._class_weights

def class_weights(self, images):  # rank 1's batch of step 2 gets a NaN class weight
    weights = generate(self, images)
    if self.rank == 1 and self.step + 1 == 2:
        weights = weights.clone()
        weights[0, 0] = math.nan
    return weights

Trainer._class_weights = class_weights
sys.exit(cli.main(sys.argv[1:]))
"""


def test_two_ranks_log_which_rank_was_bad_and_why(tmp_path):
    launcher = tmp_path / "launch.py"
    launcher.write_text(LAUNCHER.format(repo=str(REPO)))
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(launcher),
           "--threads", "1", "--synthetic-identities", "80", "--synthetic-eval-identities", "20", "--image-size",
           "16", "--width", "4", "--embedding-size", "16", "--batch-size", "16", "--queue-size", "64", "--steps", "3",
           "--log-every", "1", "--eval-pairs", "100", "--progress", "none", "--output", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, start_new_session=True)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    with open(out / "log.csv") as f:
        skips = [row for row in csv.DictReader(f) if row["kind"] == "skip"]
    assert [row["step"] for row in skips] == ["2"], skips
    message = skips[0]["message"]
    assert "rank 1 (NaN or infinite values in class_weights" in message, message
    assert "rank 0" not in message and "another process" not in message, message
