"""Running a test module's ``worker_main(out_dir)`` on several gloo ranks, once for the
multi-process test files (test_distributed, test_distributed_host_sync,
test_topology_resume).

Each rank is started by ``torchrun --standalone`` (a free localhost port, one thread per
rank) in a session of its own, so that a hang is cleaned up by killing exactly these
processes after ``deadline_s``; each rank saves what it saw to ``out_dir/rank<r>.pt``
and may write ``progress<r>.txt`` (what it is doing) for the report of a hang.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

TESTS = Path(__file__).resolve().parent


def run_ranks(module: str, world: int, out_dir: Path, deadline_s: float) -> list[dict]:
    """``module.worker_main(out_dir)`` on ``world`` ranks; every rank's saved results, in
    rank order. Fails the test on a hang or a non-zero exit, with the log's tail."""
    script = out_dir / f"rank_main{world}.py"
    # The tests, and the repository they test (installed or not), come first on the path.
    # A rank that returns ends through runtime.exit_now, as dcq-train's ranks do: after
    # destroy_process_group, gloo's thread can still hold the last collective's tensors,
    # and the interpreter's shutdown then kills it (SIGABRT after every result was saved).
    script.write_text(f"import sys\nsys.path[:0] = [{str(TESTS)!r}, {str(TESTS.parent)!r}]\n"
                      f"import {module}\n{module}.worker_main(sys.argv[1])\n"
                      "from dcq_ops.training.runtime import exit_now\nexit_now(0)\n")
    log_path = out_dir / f"log{world}.txt"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
           str(script), str(out_dir)]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            proc.wait(timeout=deadline_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            progress = [(out_dir / f"progress{r}.txt").read_text() if (out_dir / f"progress{r}.txt").exists()
                        else "-" for r in range(world)]
            pytest.fail(f"{world} ranks did not finish in {deadline_s}s (hang?); each rank at {progress}; "
                        f"log: {log_path.read_text()[-3000:]}")
    if proc.returncode != 0:
        pytest.fail(f"torchrun with {world} ranks exited with {proc.returncode}: {log_path.read_text()[-4000:]}")
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(world)]


def results_of(world_results, name: str) -> tuple[int, list]:
    """(world, every rank's result of ``name``) from ``(world, per-rank result dicts)``;
    fails the test if a rank did not run it or raised in it."""
    world, results = world_results
    per_rank = []
    for rank, result in enumerate(results):
        if name not in result:
            pytest.fail(f"rank {rank}: {name} did not run (an earlier one failed)")
        if "__error__" in result[name]:
            pytest.fail(f"rank {rank} raised in {name}:\n{result[name]['__error__']}")
        per_rank.append(result[name])
    return world, per_rank
