"""Smoke test of benchmarks/accuracy.py --quick: every variant trains, DCQ is
evaluated with the backbone and the weight generator, and the results JSON holds
every (variant, seed, evaluated model, set, metric). No accuracy or timing is
asserted (a 60-step run on a loaded machine decides neither)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "accuracy.py"


def load_benchmark():
    spec = importlib.util.spec_from_file_location("accuracy_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quick_run_writes_every_measurement(tmp_path):
    threads = torch.get_num_threads()
    bench = load_benchmark()
    try:
        report = bench.main(["--quick", "--threads", "1", "--output", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    written = json.loads((tmp_path / "accuracy_quick.json").read_text())
    assert written["quick"] is True and written["summary"].keys() == report["summary"].keys()

    variants = set(bench.variants())
    assert {"dcq", "partial_fc", "softmax"} <= variants and any(v.startswith("dcq_momentum") for v in variants)
    assert any(v.startswith("dcq_queue") for v in variants), "a queue warm-up ablation"
    rows = written["results"]
    keys = {(r["variant"], r["seed"], r["eval_model"], r["set"], r["metric"]) for r in rows}
    assert len(keys) == len(rows), "one row per measurement"
    for variant in variants:
        models = ("backbone", "generator") if variant.startswith("dcq") else ("backbone",)
        for model in models:
            for name in bench.SETS:
                for metric in bench.METRICS:
                    assert (variant, 0, model, name, metric) in keys, (variant, model, name, metric)
    assert not any(r["eval_model"] == "generator" and not r["variant"].startswith("dcq") for r in rows)
    assert all(0 <= r["value"] <= 1 for r in rows)

    assert {"dcq/backbone", "dcq/generator", "partial_fc/backbone", "softmax/backbone"} <= written["summary"].keys()
    for model in ("backbone", "generator"):
        verdict = written["verdicts"][model]
        assert set(verdict["goals"]) == {"heldout_tar1e-3_within_1_point_of_partial_fc",
                                         "heldout_tar1e-3_within_2_points_of_softmax",
                                         "tail_tar1e-3_at_or_above_partial_fc"}
        # The verdict follows the numbers it reports.
        d = verdict["differences_points"]["tar@far=0.001"]["heldout_vs_partial_fc"]["points"]
        assert verdict["goals"]["heldout_tar1e-3_within_1_point_of_partial_fc"] == (d >= -1.0)
    dcq_run = next(r for r in written["runs"] if r["variant"] == "dcq")
    assert dcq_run["levers"] == {k: bench.DCQ_LEVERS[k] for k in dcq_run["levers"]}
    assert written["references"]["heldout"]["pixels"]["accuracy"] > 0.5
    assert (tmp_path / "accuracy_quick.png").exists() or importlib.util.find_spec("matplotlib") is None


def test_calibration_rule():
    bench = load_benchmark()
    assert bench.choose({"a": 0.800, "b": 0.804}, "a") == "a", "a gain under MIN_GAIN_POINTS keeps the incumbent"
    assert bench.choose({"a": 0.800, "b": 0.806}, "a") == "b"
    assert bench.choose({"a": 0.800, "b": 0.790}, "a") == "a"
