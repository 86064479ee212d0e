"""The shared benchmark harness (benchmarks/common.py): the stable-median timer stops
when the median has settled, flags noise, keeps to its budget; peak memory sees a known
allocation; out-of-memory is told apart from bugs; results carry their meta block."""

from __future__ import annotations

import importlib.util
import json
import math
import random
import resource
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def load_common():
    spec = importlib.util.spec_from_file_location("bench_common", ROOT / "benchmarks" / "common.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


common = load_common()


class FakeClock:
    """A clock that only the measured function moves: timings without the machine's noise."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def step(self, seconds: float):
        def fn():
            self.now += seconds
        return fn


def test_constant_time_stops_at_the_minimum():
    clock = FakeClock()
    step = 2.0 ** -7  # 7.8 ms, exact in binary: every sample exactly equal
    t = common.time_stable(clock.step(step), warmup=2, min_samples=4, max_samples=100, budget_s=60, clock=clock)
    # the median is settled as soon as the minimum is taken
    assert t.samples == 4 and t.reason == "settled" and t.stable
    assert t.min_s == t.median_s == t.max_s == step
    assert t.spread == 0 and clock.now == step * (2 + 4)  # warm-up calls untimed, not skipped
    f = t.fields()
    assert f["median_ms"] == pytest.approx(1e3 * step) and f["samples"] == 4 and f["stable"] is True


def test_constant_time_with_real_sleep_stops_early():
    # the real clock: a 20 ms sleep varies by well under the 10% that counts as noise, so the
    # median settles long before max_samples (a loaded machine adds a few samples, not 200)
    t = common.time_stable(lambda: time.sleep(0.02), warmup=1, min_samples=3, max_samples=200, budget_s=3.0)
    assert t.reason == "settled" and t.samples < 50


def test_wildly_varying_duration_is_noisy():
    rng = random.Random(0)
    durations = [rng.choice((0.001, 0.004, 0.016, 0.032)) for _ in range(1000)]  # seeded: a 32x range
    it = iter(durations)
    start = time.perf_counter()
    t = common.time_stable(lambda: time.sleep(next(it)), warmup=0, min_samples=3, max_samples=60, budget_s=1.5)
    assert time.perf_counter() - start < 3.0
    assert t.samples >= 3 and not t.stable
    assert t.spread > 0.10 and t.max_s / t.min_s > 4
    assert t.fields()["stable"] is False
    assert common.fmt_timing(t)[0].startswith(common.NOISY_MARK)  # the table marks it


def test_budget_is_respected():
    # never settles (rtol 0), so only the budget stops it: no sample is started that would,
    # at the pace so far, end past the budget
    clock = FakeClock()
    t = common.time_stable(clock.step(1.0), warmup=0, min_samples=1, max_samples=1000, budget_s=3.5, rtol=0.0,
                           clock=clock)
    assert t.reason == "budget" and t.samples == 3 and t.elapsed_s <= 3.5
    # a budget spent before the minimum: it stops there, and one sample is too few to trust
    clock = FakeClock()
    t = common.time_stable(clock.step(5.0), warmup=0, min_samples=10, budget_s=2.0, clock=clock)
    assert t.samples == 1 and t.reason == "budget" and not t.stable and math.isinf(t.halfwidth)
    # the real clock
    start = time.perf_counter()
    t = common.time_stable(lambda: time.sleep(0.05), warmup=0, min_samples=100, max_samples=1000, budget_s=0.5,
                           rtol=0.0)
    assert t.reason == "budget" and time.perf_counter() - start < 0.5 + 0.3
    assert 2 <= t.samples <= 10


def test_max_samples():
    clock = FakeClock()
    t = common.time_stable(clock.step(1.0), warmup=0, min_samples=2, max_samples=5, budget_s=1e9, rtol=0.0,
                           clock=clock)
    assert t.samples == 5 and t.reason == "max_samples"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the CPU peak is read from /proc")
def test_peak_memory_of_a_known_allocation():
    page = resource.getpagesize()
    # The kernel batches its per-process RSS counters per CPU (up to 64 pages each before
    # they are folded in), so the reading is exact only to that many pages; a little more
    # for the allocator's header and Python's own small allocations.
    tolerance = 64 * page * (1 + (torch.get_num_threads() or 1)) + 16 * page
    torch.ones(1 << 20, dtype=torch.uint8)  # first-call set-up of the op, outside the measurement
    size = 48 << 20
    with common.PeakMemory("cpu") as peak:
        if peak.base is None:
            pytest.skip("VmHWM cannot be reset here")
        block = torch.ones(size, dtype=torch.uint8)  # touched: every page resident
        del block  # freed before the reading: the peak, not the current size, is measured
        measured = peak.read()
    assert abs(measured - size) <= tolerance, (measured, size, tolerance)
    assert common.peak_bytes(lambda: torch.ones(size // 2, dtype=torch.uint8)) == pytest.approx(
        size // 2, abs=tolerance)
    with common.PeakMemory("cpu") as peak:  # nothing allocated: nothing measured
        assert peak.read() <= tolerance


def test_out_of_memory_is_told_apart_from_bugs():
    assert common.is_oom(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert common.is_oom(torch.OutOfMemoryError("simulated"))
    assert common.is_oom(RuntimeError("CUDA error: out of memory"))
    assert common.is_oom(RuntimeError("[enforce fail] DefaultCPUAllocator: can't allocate memory: you tried"))
    assert common.is_oom(MemoryError())
    assert not common.is_oom(RuntimeError("a real bug"))
    assert not common.is_oom(ValueError("out of memory"))  # not an allocator's error type
    try:  # a real failed host allocation: 2^62 bytes
        torch.empty(1 << 62, dtype=torch.uint8)
    except Exception as exc:  # noqa: BLE001
        assert common.is_oom(exc), exc
    else:
        pytest.skip("the allocator granted 2^62 bytes (overcommit)")


def test_meta_and_result_files(tmp_path):
    meta = common.meta("x.py", ["--a", "1"], "cpu", extra=1)
    assert meta["command"] == "benchmarks/x.py --a 1" and meta["extra"] == 1
    assert meta["hardware"]["cpu"] and meta["hardware"]["cpu_count"] >= 1 and meta["hardware"]["torch_threads"] >= 1
    assert meta["versions"]["torch"] == torch.__version__ and meta["versions"]["python"]
    assert {"triton", "cuda", "dcq_ops"} <= set(meta["versions"])
    assert "CPU" in common.describe(meta)
    path = common.write_json(tmp_path / "a" / "r.json", {"rows": [1]}, meta)
    data = json.loads(path.read_text())
    assert list(data) == ["meta", "rows"] and data["meta"]["command"] == meta["command"]
    common.write_json(tmp_path / "l.json", [{"a": 1}], meta)  # a list stays a list
    assert json.loads((tmp_path / "l.json").read_text()) == [{"a": 1}]
    common.write_csv(tmp_path / "r.csv", [{"a": 1.23456789, "b": None}], ["a", "b"])
    assert (tmp_path / "r.csv").read_text().splitlines() == ["a,b", "1.2346,"]
    table = common.format_table(["name", "ms", "MiB"], [["x", "1.0", "2"], ["y", "OOM"]])
    lines = table.splitlines()
    assert lines[0].split() == ["name", "ms", "MiB"] and lines[3].split() == ["y", "OOM"]  # status as free text
    assert common.DTYPES["bf16"] is torch.bfloat16 and common.DTYPE_NAMES[torch.float16] == "fp16"
