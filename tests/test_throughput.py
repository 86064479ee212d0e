"""Smoke tests of benchmarks/throughput.py: its smallest configurations run and write
outputs of the documented shape. No timing is asserted (the machine's load decides it)."""

from __future__ import annotations

import csv
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dcq_ops

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "throughput.py"

# The smallest meaningful run: every method, two class counts, a 32-pixel tiny backbone;
# one thread, so that other processes on a small shared machine do not stall it.
TINY = ["--device", "cpu", "--threads", "1", "--batch-size", "4", "--embedding-size", "16", "--image-size", "32",
        "--repeats", "1", "--warmup", "0", "--iters", "1"]


def load_benchmark():
    spec = importlib.util.spec_from_file_location("throughput_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench():
    return load_benchmark()


def read_csv(path: Path) -> tuple[list[str], list[dict]]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


BIG = "1000000000000"  # 10^12 classes: more than any machine's RAM


def test_end2end_writes_one_row_per_config(bench, tmp_path):
    out = tmp_path / "run"
    result = bench.main(TINY + ["--classes", f"200,400,{BIG}", "--out", str(out)])

    header, all_rows = read_csv(out.with_suffix(".csv"))
    assert header == bench.COLUMNS
    # the two reference steps once, then every head at every class count, in that order
    expected = [("backbone", ""), ("backbone_gen", "")] + [
        (m, c) for c in ("200", "400", BIG) for m in ("softmax", "partial_fc", "dcq")]
    assert [(r["method"], r["classes"]) for r in all_rows] == expected
    # 10^12 classes are refused before anything is allocated, and the run goes on
    for r in all_rows[-3:]:
        assert r["status"].startswith("skipped: needs ") and r["samples_per_s"] == ""
    rows = all_rows[:-3]
    for r in rows:
        assert r["status"] == "ok"
        assert float(r["samples_per_s"]) > 0 and float(r["step_ms"]) > 0
        assert float(r["state_mib"]) > 0
    # ratios are against the full softmax of the same class count: exactly 1 for itself
    for r in rows:
        if r["method"] == "softmax":
            assert float(r["vs_softmax"]) == pytest.approx(1.0)
        if r["method"] == "backbone":
            assert r["vs_softmax"] == "" and float(r["vs_backbone"]) == pytest.approx(1.0)
        if r["method"] == "backbone_gen":  # carries the generator's EMA copy: more state than the backbone
            assert float(r["state_mib"]) > float(rows[0]["state_mib"])
    # queue / sample size: 10% of the classes, rounded up
    assert [r["queue_or_sample"] for r in rows if r["method"] in ("dcq", "partial_fc")] == ["20", "20", "40", "40"]

    with open(out.with_suffix(".json")) as f:
        data = json.load(f)
    assert set(data) == {"meta", "rows"}
    assert {"hardware", "versions", "settings", "command", "date", "dcq_backend"} <= set(data["meta"])
    assert data["meta"]["hardware"]["cpu"]
    # the CPU loss names who computed its GEMMs
    assert data["meta"]["cpu_gemm"] == dcq_ops.cpu_gemm_provider()  # main() ran in this process
    assert data["meta"]["versions"]["torch"] == torch.__version__
    assert len(data["rows"]) == len(expected)
    assert data["rows"][-1]["status"].startswith("skipped")
    assert [r["method"] for r in data["rows"]] == [m for m, _ in expected]

    png = out.with_suffix(".png")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert not png.exists()  # the benchmark skips the plot (with a message) without matplotlib
    else:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert result["paths"]["csv"] == out.with_suffix(".csv")


def test_cli_loss_mode(tmp_path):
    """As a user runs it: a subprocess from another working directory, loss mode (no backbone row)."""
    out = tmp_path / "loss"
    proc = subprocess.run([sys.executable, str(SCRIPT), *TINY, "--mode", "loss", "--classes", "300",
                           "--no-plot", "--out", str(out)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    # the table and the hardware line on stdout, the progress on stderr
    assert "samples/s" in proc.stdout and "CPU" in proc.stdout
    assert "[3/3] dcq @ 300 classes" in proc.stderr
    header, rows = read_csv(out.with_suffix(".csv"))
    assert [r["method"] for r in rows] == ["softmax", "partial_fc", "dcq"]
    assert {r["mode"] for r in rows} == {"loss"}
    assert all(r["backbone"] == "" and r["status"] == "ok" for r in rows)
    assert not out.with_suffix(".png").exists()


def fake_measure(method, classes, args, device):
    """What measure() returns, without the work: these tests are about the bookkeeping."""
    return dict(status="ok", step_ms=10.0, step_ms_min=9.0, step_ms_max=11.0, samples_per_s=100.0,
                peak_mib=1.0, state_mib=1.0)


def test_out_of_memory_is_reported_and_the_run_goes_on(bench, tmp_path, monkeypatch):
    def measure(method, classes, args, device):
        if method == "softmax" and classes == 200:
            raise torch.OutOfMemoryError("simulated")
        return fake_measure(method, classes, args, device)

    monkeypatch.setattr(bench, "measure", measure)
    out = tmp_path / "oom"
    result = bench.main(TINY + ["--methods", "softmax,dcq", "--classes", "100,200", "--no-plot",
                                "--out", str(out)])
    rows = {(r["method"], r["classes"]): r for r in result["rows"]}
    assert rows[("softmax", 200)]["status"] == "OOM"
    assert rows[("dcq", 200)]["status"] == "ok"
    assert rows[("dcq", 200)]["vs_softmax"] is None  # no softmax to compare against at 200
    assert rows[("dcq", 100)]["vs_softmax"] == pytest.approx(1.0)
    assert "OOM" in bench.format_table(result["rows"])


def test_other_errors_are_not_swallowed(bench, tmp_path, monkeypatch):
    # only running out of memory is a result; a bug must fail the run
    def measure(method, classes, args, device):
        raise RuntimeError("a real bug")

    monkeypatch.setattr(bench, "measure", measure)
    with pytest.raises(RuntimeError, match="a real bug"):
        bench.main(TINY + ["--methods", "dcq", "--classes", "100", "--no-plot", "--out", str(tmp_path / "x")])


def test_parse_classes(bench):
    assert bench.parse_classes("1e4, 2e6,300") == [10_000, 2_000_000, 300]
    with pytest.raises(Exception, match="positive integers"):
        bench.parse_classes("1.5")
