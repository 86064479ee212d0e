"""Smoke test of benchmarks/scaling.py: its smallest sweep runs on 1 and 2 gloo ranks,
writes JSON/CSV/PNG of the documented shape, and the bytes it counts at the
collectives agree with the model of docs/distributed.md. No timing is asserted."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "scaling.py"

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")


def run(*args, timeout=300):
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT)


def test_smallest_sweep_writes_results_and_counts_the_modelled_bytes(tmp_path):
    out = tmp_path / "scaling"
    proc = run("--worlds", "1,2", "--queue-sizes", "300,900", "--dim", "8", "--rows", "5", "--warmup", "1",
               "--repeats", "1", "--out", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    with open(out.with_suffix(".csv"), newline="") as f:
        assert len(list(csv.DictReader(f))) == len(rows)
    assert out.with_suffix(".png").stat().st_size > 0 or "matplotlib is not installed" in proc.stderr
    # one rank: one row per queue size ("none"); two ranks: both modes per queue size
    assert [(r["mode"], r["ranks"], r["queue_size"]) for r in rows] == [
        ("none", 1, 300), ("none", 1, 900),
        ("gathered", 2, 300), ("sharded", 2, 300), ("gathered", 2, 900), ("sharded", 2, 900)]
    for r in rows:
        assert r["status"] == "ok" and r["median_ms"] > 0
        shard = r["queue_size"] // r["ranks"] if r["mode"] == "sharded" else r["queue_size"]
        assert r["queue_mib"] * 2 ** 20 >= shard * 8 * 4  # at least the weights of its slots
        if r["ranks"] == 1:
            assert r["sent_bytes"] == 0  # the single-process path never communicates
            continue
        # What the collectives counted is exactly the model of docs/distributed.md.
        assert r["sent_bytes"] == r["model_bytes"], r
    # Neither mode's traffic depends on the queue size.
    by = {(r["mode"], r["queue_size"]): r["sent_bytes"] for r in rows if r["ranks"] == 2}
    assert by["gathered", 300] == by["gathered", 900] and by["sharded", 300] == by["sharded", 900]
    assert by["sharded", 300] > by["gathered", 300]


@pytest.mark.parametrize("bad", [["--worlds", "0"], ["--modes", "ring"], ["--queue-sizes", "x"],
                                 ["--queue-sizes", "4", "--rows", "8"], ["--dim", "0"]])
def test_bad_arguments_exit_2(bad):
    proc = run(*bad, timeout=60)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "error" in proc.stderr
