"""The benchmark harness every script in benchmarks/ shares: what is measured the
same way everywhere lives here once, so the scripts hold only their set-up and sweep.

- ``synchronize``: wait for the device (a no-op on the CPU);
- ``time_stable``: repeat a measurement until its median is settled or a time
  budget is spent; a ``Timing`` with min / median / max, the number of samples
  and a ``stable`` flag that is False when the samples are too spread (or too
  few) for the median to be trusted: such a number is noise, not a result;
- ``PeakMemory``: the peak growth of memory over a block (CUDA allocator
  statistics, or the peak resident set size of the process on the CPU);
- ``is_oom``: whether an exception means "out of memory";
- ``DTYPES``: the dtype names the scripts take on their command lines;
- ``cpu_model``, ``hardware``, ``versions``, ``meta``: what ran the benchmark;
- ``write_json``, ``write_csv``, ``pyplot``, ``format_table``: the results.
"""

from __future__ import annotations

import csv
import ctypes
import datetime
import gc
import json
import math
import os
import platform
import re
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"
MIB = 2 ** 20
GIB = 2 ** 30
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
NOISY_MARK = "~"
NOISY_LEGEND = (f"{NOISY_MARK}: noisy - the samples spread too wide (or too few of them) for the median to be "
                "trusted; rerun on a quiet machine before reading anything into it")


def synchronize(device: torch.device | str | None) -> None:
    device = torch.device(device) if device is not None else None
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------- timing


def _quantile(sorted_values: list[float], q: float) -> float:
    """Linear interpolation between order statistics (numpy's default)."""
    pos = q * (len(sorted_values) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (pos - lo) * (sorted_values[hi] - sorted_values[lo])


@dataclass
class Timing:
    """Samples of one measurement, in seconds, and what they are worth."""

    times_s: list[float] = field(default_factory=list)
    stable: bool = False
    reason: str = ""  # why sampling stopped: settled, budget, max_samples
    elapsed_s: float = 0.0  # wall time of the timed samples (warm-up excluded)

    @property
    def samples(self) -> int:
        return len(self.times_s)

    @property
    def median_s(self) -> float:
        return statistics.median(self.times_s)

    @property
    def min_s(self) -> float:
        return min(self.times_s)

    @property
    def max_s(self) -> float:
        return max(self.times_s)

    @property
    def spread(self) -> float:
        """(p75 - p25) / median: the width of the middle half of the samples."""
        s = sorted(self.times_s)
        return (_quantile(s, 0.75) - _quantile(s, 0.25)) / self.median_s if self.median_s > 0 else 0.0

    @property
    def halfwidth(self) -> float:
        """Relative half-width of a ~95% interval of the median: 1.57 IQR / sqrt(n) / median
        (McGill, Tukey and Larsen's box-plot notch). Infinite for one sample: no estimate."""
        return self.spread * 1.57 / math.sqrt(self.samples) if self.samples > 1 else math.inf

    def fields(self, unit: str = "ms") -> dict:
        """The JSON / CSV fields: min_<unit>, median_<unit>, max_<unit>, spread, samples, stable."""
        scale = {"ms": 1e3, "s": 1.0}[unit]
        return {f"min_{unit}": scale * self.min_s, f"median_{unit}": scale * self.median_s,
                f"max_{unit}": scale * self.max_s, "spread": self.spread, "samples": self.samples,
                "stable": self.stable, "timing_stop": self.reason}


def time_stable(fn, device=None, *, warmup: int = 1, inner: int = 1, min_samples: int = 3,
                max_samples: int = 100, budget_s: float = 5.0, rtol: float = 0.025, max_spread: float = 0.10,
                clock=time.perf_counter) -> Timing:
    """Time ``fn()`` (``inner`` calls per sample, the device synchronised around each
    sample; CUDA events on a GPU) after ``warmup`` untimed calls, until the median is
    settled: at least ``min_samples`` samples (and 3) and the median's relative half-width
    (``Timing.halfwidth``) under ``rtol``. Sampling also stops at ``max_samples`` or
    when the next sample, at the median pace so far, would end past ``budget_s`` of
    timed samples (the minimum is taken as long as the budget is not yet spent; one
    sample always is).

    ``stable`` is False ("noisy") when fewer than 3 samples were taken, when the middle
    half of the samples is wider than ``max_spread`` of the median, or when the median
    did not get within 2 ``rtol``: then the median is not to be presented as a result."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    events = device.type == "cuda"
    for _ in range(warmup):
        fn()
    synchronize(device)
    timing = Timing()
    start = clock()
    while True:
        if events:
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            for _ in range(inner):
                fn()
            end.record()
            end.synchronize()
            timing.times_s.append(begin.elapsed_time(end) / 1e3 / inner)
        else:
            t0 = clock()
            for _ in range(inner):
                fn()
            synchronize(device)
            timing.times_s.append((clock() - t0) / inner)
        timing.elapsed_s = clock() - start
        n = timing.samples
        if n >= max(min_samples, 3) and timing.halfwidth < rtol:  # fewer than 3 is never stable
            timing.reason = "settled"
            break
        if n >= max_samples:
            timing.reason = "max_samples"
            break
        pace = timing.median_s * inner
        if timing.elapsed_s >= budget_s or (n >= min_samples and timing.elapsed_s + pace > budget_s):
            timing.reason = "budget"
            break
    timing.stable = timing.samples >= 3 and timing.spread <= max_spread and timing.halfwidth <= 2 * rtol
    return timing


def fmt_timing(t: Timing, scale: float = 1e3, spec: str = ".1f") -> list[str]:
    """Table cells: the median (with NOISY_MARK when noisy), min-max, spread %, samples."""
    mark = "" if t.stable else NOISY_MARK
    return [mark + format(scale * t.median_s, spec),
            f"{format(scale * t.min_s, spec)}-{format(scale * t.max_s, spec)}",
            f"{100 * t.spread:.0f}%", str(t.samples)]


def format_table(head: list[str], rows: list[list[str]], left: int = 1) -> str:
    """Columns right-aligned (the first ``left`` left-aligned). A row shorter than the
    head (an OOM, a skipped configuration) shows its last cell as free text after the others."""
    full = [r for r in rows if len(r) == len(head)]
    widths = [max([len(head[i])] + [len(r[i]) for r in full]) for i in range(len(head))]

    def line(cells):
        return "  ".join(c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    out = [line(head), "  ".join("-" * w for w in widths)]
    for r in rows:
        out.append(line(r) if len(r) == len(head) else line(r[:-1]) + "  " + r[-1])
    return "\n".join(out)


# --------------------------------------------------------------------------- memory


def _proc_field(path: str, key: str) -> int | None:
    """A ``<key>: <n> kB`` field of a /proc file, in bytes; None where there is none."""
    try:
        with open(path) as f:
            m = re.search(rf"^{key}:\s+(\d+) kB", f.read(), re.M)
        return int(m.group(1)) * 1024 if m else None
    except OSError:
        return None


def total_ram() -> int | None:
    return _proc_field("/proc/meminfo", "MemTotal")


def available_ram() -> int | None:
    """Bytes this process can still take: MemAvailable, capped by a cgroup (v2) limit."""
    avail = _proc_field("/proc/meminfo", "MemAvailable")
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            cg = int(limit) - int(Path("/sys/fs/cgroup/memory.current").read_text())
            avail = cg if avail is None else min(avail, cg)
    except (OSError, ValueError):
        pass
    return avail


def release_memory(device=None) -> None:
    gc.collect()
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
    try:  # hand freed heap pages back to the OS, so that the next baseline RSS is honest
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """The peak growth of memory over a ``with`` block, in bytes (``read()``).

    CUDA: ``max_memory_allocated`` (reset on entry) minus what was allocated on entry:
    tensors only, not the caching allocator's reserve. CPU: the peak resident set size
    (VmHWM, reset on entry through /proc/self/clear_refs) minus the resident size on
    entry: process memory, so allocator slack and library workspaces count and pages
    never touched do not. ``read()`` is None where VmHWM cannot be reset (not Linux)."""

    def __init__(self, device=None):
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.base: int | None = None

    def __enter__(self):
        release_memory(self.device)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            self.base = _proc_field("/proc/self/status", "VmRSS") if _reset_peak_rss() else None
        return self

    def read(self) -> int | None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) - self.base
        if self.base is None:
            return None
        hwm = _proc_field("/proc/self/status", "VmHWM")
        return None if hwm is None else max(0, hwm - self.base)

    def __exit__(self, *exc):
        return False


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_bytes(fn, device=None) -> int | None:
    """The peak memory growth of one call of ``fn()`` (see PeakMemory)."""
    with PeakMemory(device) as peak:
        fn()
        return peak.read()


def is_oom(exc: BaseException) -> bool:
    """Out of memory: torch's OutOfMemoryError, Python's MemoryError, or a RuntimeError
    with an allocator's message (CUDA's "out of memory", the CPU allocator's "can't
    allocate memory"). Anything else is a bug and must not be reported as a result."""
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


# --------------------------------------------------------------------------- what ran it


def cpu_model() -> str:
    """The model name the CPU reports (/proc/cpuinfo), else what platform knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> float | None:
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


def hardware(device=None) -> dict:
    device = torch.device(device) if device is not None else torch.device("cpu")
    ram = total_ram()
    info = {"cpu": cpu_model(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "ram_gib": round(ram / GIB, 1) if ram else None, "platform": platform.platform(),
            "machine": platform.machine(), "load_average_1min": load_average()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = props.name
        info["gpu_memory_gib"] = round(props.total_memory / GIB, 1)
    return info


def versions(**extra) -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
    for name in ("dcq_ops", "triton"):
        module = sys.modules.get(name)
        if module is None and name == "triton":
            try:
                import triton as module
            except ImportError:
                module = None
        out[name] = getattr(module, "__version__", "?") if module is not None else None
    out.update(extra)
    return out


def meta(script: str, argv, device=None, **extra) -> dict:
    """The ``meta`` block of a result file: when, the command, the device, hardware, versions."""
    return {"date": datetime.datetime.now().isoformat(timespec="seconds"),
            "command": " ".join([f"benchmarks/{script}"] + list(argv if argv is not None else sys.argv[1:])),
            "device": str(device or "cpu"), "hardware": hardware(device), "versions": versions(), **extra}


def describe(m: dict) -> str:
    """One line for the top of a table: device, CPU, threads, versions."""
    hw = m["hardware"]
    gpu = f"GPU {hw['gpu']} ({hw['gpu_memory_gib']} GiB) | " if "gpu" in hw else ""
    return (f"# device: {m['device']} | {gpu}CPU {hw['cpu']} x{hw['cpu_count']} ({hw['torch_threads']} torch "
            f"threads), RAM {hw['ram_gib']} GiB\n# versions: "
            + ", ".join(f"{k} {v}" for k, v in m["versions"].items()))


def warn_if_loaded(threshold: float = 0.5) -> None:
    load = load_average()
    if load is not None and load > threshold:
        print(f"# warning: load average {load} before the run: other processes share the CPU, "
              "timings will be noisy", flush=True)


# --------------------------------------------------------------------------- results


def write_json(path, payload, meta_block: dict | None = None) -> Path:
    """A dict payload gets the ``meta`` block as its first key; a list is written as it is."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if meta_block is not None and isinstance(payload, dict):
        payload = {"meta": meta_block, **{k: v for k, v in payload.items() if k != "meta"}}
    path.write_text(json.dumps(payload, indent=1, default=str) + "\n")
    return path


def write_csv(path, rows: list[dict], columns: list[str]) -> Path:
    """One line per row in ``columns``' order; None as empty, floats to 4 decimals."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else (round(r[k], 4) if isinstance(r[k], float) else r[k]))
                        for k in columns})
    return path


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend, or None (with a message) without it."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install matplotlib, or the `bench` extra): no plot written",
              file=sys.stderr)
        return None
    return plt
