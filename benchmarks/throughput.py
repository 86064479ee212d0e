#!/usr/bin/env python
"""Training throughput and peak memory of DCQ against a full softmax and Partial FC.

    python benchmarks/throughput.py                 # the embedded default for this machine
    python benchmarks/throughput.py --mode loss     # the head alone, no backbone
    python benchmarks/throughput.py --device cuda --classes 1e5,1e6,1e7 --batch-size 128

One row = one training step, timed end to end, for one head at one number of classes:

- ``backbone``:   backbone forward + backward + SGD step (the reference line: no head);
- ``backbone_gen``: the same plus DCQ's weight generator (forward of the second view, EMA
  update): a DCQ step without its loss, so that DCQ / backbone_gen is the loss's own cost;
- ``softmax``:    + a normalised FC over every class with the margin (weights, their
  gradient and SGD momentum held in memory: arcface_torch with sample_rate 1.0);
- ``partial_fc``: + Partial FC with 10% of the classes sampled per step (PartialFC_V2);
- ``dcq``:        + the weight generator (an EMA copy of the backbone) embedding a second
  view, the DCQ loss against a queue of 10% of the classes, the enqueue, the EMA update.

The optimizer is SGD with momentum 0.9 and weight decay 5e-4 over the backbone and the
head, with gradient clipping at norm 5, as arcface_torch. ``--mode loss`` drops the
backbone: random embeddings go straight into the head (loss, backward, optimizer step).

Timing: a warm-up, then ``--repeats`` timed repeats of ``--iters`` steps each (device
synchronised before and after each repeat); the table gives medians.

Memory, per row ("peak_mib"): the growth of the process's memory from before the row's
models are built to the highest point during its steps, so it holds parameters, optimizer
state, gradients, the queue, the activations and every temporary of the step.
- CUDA: ``torch.cuda.max_memory_allocated()`` (reset before each row) minus what was
  allocated before the row: tensors only, not the caching allocator's reserve.
- CPU: the peak resident set size (VmHWM, reset before each row through
  /proc/self/clear_refs) minus the resident size before the row. This is process memory,
  not tensor bytes: allocator slack and library workspaces count, and pages never touched
  do not. Where VmHWM cannot be reset (not Linux), the column is left empty.
"state_mib" is exact, not measured: the bytes of the parameters, buffers (the queue) and
optimizer state that live between steps.

Configurations that cannot fit are reported, and the run goes on: ``OOM`` when the device
ran out of memory; on the CPU a configuration whose estimated peak exceeds the memory
available is not started at all ("skipped: needs X GiB"), because running out of host
memory gets the process killed rather than an exception.

Outputs: a table on stdout (throughput ratios against the full softmax at the same number
of classes, measured in this run), the hardware and versions; ``<out>.csv``, ``<out>.json``
and ``<out>.png`` (needs matplotlib; skipped with a message without it). ``--out`` is the
path without extension, by default benchmarks/results/throughput_<device>[_loss].
"""

from __future__ import annotations

import argparse
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
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import nn

import dcq_ops
from dcq_ops import MomentumEncoder
from dcq_ops.training.heads import build_head
from dcq_ops.training.backbones import BACKBONES, build_backbone

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hardware import cpu_model  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"
HEADS = ("softmax", "partial_fc", "dcq")
REFERENCES = ("backbone", "backbone_gen")  # no head: independent of the number of classes
METHODS = REFERENCES + HEADS
GIB = 2 ** 30
MIB = 2 ** 20
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# Embedded defaults, by device type. The CPU default finishes in a minute or two on two
# cores and still spans two decades of classes; the CUDA default is the sweep.
DEFAULTS = {
    "cpu": dict(classes="1e4,1e5,1e6", batch_size=64, backbone="small_cnn", dtype="fp32",
                repeats=3, warmup=1, iters=1),
    "cuda": dict(classes="1e5,1e6,2e6,4e6,1e7", batch_size=128, backbone="iresnet50", dtype="fp16",
                 repeats=5, warmup=3, iters=5),
}


# --------------------------------------------------------------------------- backbones


def make_backbone(name: str, embedding_size: int, image_size: int) -> nn.Module:
    return build_backbone(name, embedding_size=embedding_size, image_size=image_size)


# --------------------------------------------------------------------------- hardware and memory


def hardware(device: torch.device) -> dict:
    info = {
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "ram_gib": round(total_ram() / GIB, 1) if total_ram() else None,
        "platform": platform.platform(),
        "load_average_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = props.name
        info["gpu_memory_gib"] = round(props.total_memory / GIB, 1)
    return info


def versions() -> dict:
    v = {"python": platform.python_version(), "torch": torch.__version__,
         "dcq_ops": getattr(dcq_ops, "__version__", "?"), "cuda": torch.version.cuda}
    try:
        import triton
        v["triton"] = triton.__version__
    except ImportError:
        v["triton"] = None
    return v


def _meminfo(key: str) -> int | None:
    try:
        with open("/proc/meminfo") as f:
            m = re.search(rf"^{key}:\s+(\d+) kB", f.read(), re.M)
        return int(m.group(1)) * 1024 if m else None
    except OSError:
        return None


def total_ram() -> int | None:
    return _meminfo("MemTotal")


def available_ram() -> int | None:
    """Bytes this process can still take: MemAvailable, capped by a cgroup (v2) limit."""
    avail = _meminfo("MemAvailable")
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            used = int(Path("/sys/fs/cgroup/memory.current").read_text())
            cg = int(limit) - used
            avail = cg if avail is None else min(avail, cg)
    except (OSError, ValueError):
        pass
    return avail


def _status(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            m = re.search(rf"^{key}:\s+(\d+) kB", f.read(), re.M)
        return int(m.group(1)) * 1024 if m else None
    except OSError:
        return None


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _release_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    try:  # hand freed heap pages back to the OS, so the next row's baseline RSS is honest
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """The peak growth of memory over a block (see the module's docstring)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak: int | None = None

    def __enter__(self):
        _release_memory(self.device)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            self.base = _status("VmRSS") if _reset_peak_rss() else None
        return self

    def read(self) -> int | None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) - self.base
        if self.base is None:
            return None
        hwm = _status("VmHWM")
        return None if hwm is None else max(0, hwm - self.base)

    def __exit__(self, *exc):
        return False


def estimate_peak_bytes(method: str, classes: int, args) -> int:
    """A deliberately generous estimate of a row's peak memory, for refusing on the CPU
    what cannot fit. Per-class tensors of the softmax and Partial FC: the weights, their
    gradient, the momentum, the weight-decay temporary of SGD and the normalised copy
    (about 5-6 copies of [C, D] fp32), plus the logits and their temporaries ([N, C] a
    few times). DCQ holds the queue [K, D] and the labels only."""
    d, n = args.embedding_size, args.batch_size
    sampled = math.ceil(args.sample_rate * classes)
    if method == "softmax":
        return 6 * classes * d * 4 + 6 * n * classes * 4
    if method == "partial_fc":
        return 6 * classes * d * 4 + 3 * sampled * d * 4 + 6 * n * sampled * 4 + 2 * classes * 4
    if method == "dcq":
        return sampled * (d * 4 + 8) + 4 * n * min(sampled, 1 << 16) * 4
    return 0


# --------------------------------------------------------------------------- one row


def state_bytes(*objects) -> int:
    """Bytes of the parameters and buffers of modules and the state of optimizers."""
    seen, total = set(), 0

    def add(t):
        nonlocal total
        if isinstance(t, torch.Tensor) and id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()

    for obj in objects:
        if obj is None:
            continue
        if isinstance(obj, nn.Module):
            for t in list(obj.parameters()) + list(obj.buffers()):
                add(t)
        elif isinstance(obj, torch.optim.Optimizer):
            for state in obj.state.values():
                for t in state.values():
                    add(t)
    return total


class Step:
    """The models, optimizer and fixed random inputs of one row; ``step()`` runs one
    training step (no synchronisation inside)."""

    def __init__(self, method: str, classes: int | None, args, device: torch.device):
        self.method, self.args, self.device = method, args, device
        dtype = DTYPES[args.dtype]
        self.autocast = (torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext())
        n, d = args.batch_size, args.embedding_size
        with torch.device(device):  # build in place: no [C, D] copy through host memory
            self.backbone = None
            if args.mode == "end2end":
                self.backbone = make_backbone(args.backbone, d, args.image_size).train()
            self.head = None
            if method in HEADS:
                kwargs = {}
                if method == "dcq":
                    kwargs = dict(fp16=dtype != torch.float32, backend=args.dcq_backend)
                self.head = build_head(method, classes, d, sample_rate=args.sample_rate, **kwargs).train()
            self.generator = None
            if method in ("dcq", "backbone_gen") and self.backbone is not None:
                self.generator = MomentumEncoder(self.backbone, momentum=0.999)
            params = []
            if self.backbone is not None:
                params += list(self.backbone.parameters())
            if self.head is not None:
                params += list(self.head.parameters())
            self.optimizer = (torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=5e-4)
                              if params else None)
            self.scaler = (torch.amp.GradScaler(device.type)
                           if dtype == torch.float16 and device.type == "cuda" and self.optimizer else None)
            gen = torch.Generator(device=device).manual_seed(0)
            self.labels = torch.randint(0, classes or 1, (n,), generator=gen, device=device)
            if self.backbone is not None:
                shape = (n, 3, args.image_size, args.image_size)
                self.view_a = torch.randn(shape, generator=gen, device=device)
                self.view_b = torch.randn(shape, generator=gen, device=device) if self.generator else None
            else:  # loss only: the embeddings are the leaf that receives the gradient
                emb_dtype = dtype
                self.embeddings = torch.randn(n, d, generator=gen, device=device, dtype=emb_dtype).requires_grad_()
                self.class_weights = (torch.randn(n, d, generator=gen, device=device, dtype=emb_dtype)
                                      if method == "dcq" else None)

    def step(self) -> None:
        if self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=True)
        if self.backbone is None:
            self.embeddings.grad = None
            loss = self.head(self.embeddings, self.labels, self.class_weights)
        else:
            with self.autocast:
                embeddings = self.backbone(self.view_a)
                class_weights = self.generator(self.view_b) if self.generator is not None else None
                if self.head is None:  # a reference row: a stand-in loss with no per-class cost
                    loss = embeddings.float().square().mean()
                else:
                    loss = self.head(embeddings, self.labels, class_weights)  # DCQ enqueues here
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            loss.backward()
        if self.backbone is not None:
            torch.nn.utils.clip_grad_norm_(self.backbone.parameters(), 5)
        if self.optimizer is not None:
            if self.scaler is not None:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()
        if self.generator is not None:
            self.generator.update()

    def state(self) -> int:
        return state_bytes(self.backbone, self.head, self.generator, self.optimizer)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(method: str, classes: int | None, args, device: torch.device) -> dict:
    """Build, warm up, time one row. Raises torch.OutOfMemoryError when it does not fit."""
    with PeakMemory(device) as peak:
        bench = Step(method, classes, args, device)
        for _ in range(args.warmup):
            bench.step()
        _sync(device)
        times = []
        for _ in range(args.repeats):
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(args.iters):
                bench.step()
            _sync(device)
            times.append((time.perf_counter() - t0) / args.iters)
        peak_bytes = peak.read()
        state = bench.state()
        del bench
    step_s = statistics.median(times)
    return dict(status="ok", step_ms=1e3 * step_s, step_ms_min=1e3 * min(times), step_ms_max=1e3 * max(times),
                samples_per_s=args.batch_size / step_s,
                peak_mib=None if peak_bytes is None else peak_bytes / MIB, state_mib=state / MIB)


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    # a failed host allocation: "DefaultCPUAllocator: can't allocate memory"
    return isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc)


def run_row(method: str, classes: int | None, args, device: torch.device) -> dict:
    row = dict(method=method, classes=classes, mode=args.mode, batch_size=args.batch_size, dtype=args.dtype,
               backbone=args.backbone if args.mode == "end2end" else None,
               queue_or_sample=math.ceil(args.sample_rate * classes) if method in ("partial_fc", "dcq") else None)
    if device.type == "cpu" and method in HEADS:
        need, avail = estimate_peak_bytes(method, classes, args), available_ram()
        if avail is not None and need > 0.9 * avail:
            row["status"] = f"skipped: needs {need / GIB:.1f} GiB ({avail / GIB:.1f} GiB available)"
            return row
    try:
        row.update(measure(method, classes, args, device))
    except Exception as exc:  # noqa: BLE001 - only out-of-memory is reported and survived
        if not _is_oom(exc):
            raise
        row["status"] = "OOM"
    finally:
        _release_memory(device)
    return row


# --------------------------------------------------------------------------- reporting

COLUMNS = ["mode", "method", "classes", "queue_or_sample", "status", "samples_per_s", "step_ms", "step_ms_min",
           "step_ms_max", "vs_softmax", "vs_backbone", "peak_mib", "mem_vs_softmax", "state_mib", "batch_size",
           "dtype", "backbone"]


def add_ratios(rows: list[dict]) -> None:
    """Throughput and memory ratios against the full softmax at the same number of classes
    and throughput against the backbone-only step, all from this run."""
    softmax = {r["classes"]: r for r in rows if r["method"] == "softmax" and r.get("status") == "ok"}
    backbone = next((r for r in rows if r["method"] == "backbone" and r.get("status") == "ok"), None)
    for r in rows:
        r.setdefault("vs_softmax", None)
        r.setdefault("vs_backbone", None)
        r.setdefault("mem_vs_softmax", None)
        if r.get("status") != "ok":
            continue
        ref = softmax.get(r["classes"])
        if ref is not None:
            r["vs_softmax"] = r["samples_per_s"] / ref["samples_per_s"]
            if r.get("peak_mib") and ref.get("peak_mib"):
                r["mem_vs_softmax"] = r["peak_mib"] / ref["peak_mib"]
        if backbone is not None:
            r["vs_backbone"] = r["samples_per_s"] / backbone["samples_per_s"]


def _fmt(v, spec=".1f") -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return format(v, spec)
    return str(v)


def format_table(rows: list[dict]) -> str:
    head = ["method", "classes", "K/S", "samples/s", "ms/step", "x softmax", "x backbone", "peak MiB",
            "mem x softmax", "state MiB"]
    lines = []
    for r in rows:
        if r.get("status") != "ok":
            lines.append([r["method"], f"{r['classes']:,}" if r["classes"] else "-", _fmt(r["queue_or_sample"]),
                          r["status"]])
            continue
        lines.append([r["method"], f"{r['classes']:,}" if r["classes"] else "-", _fmt(r["queue_or_sample"]),
                      _fmt(r["samples_per_s"]), _fmt(r["step_ms"]), _fmt(r["vs_softmax"], ".2f"),
                      _fmt(r["vs_backbone"], ".2f"), _fmt(r["peak_mib"], ".0f"), _fmt(r["mem_vs_softmax"], ".3f"),
                      _fmt(r["state_mib"], ".0f")])
    widths = [max(len(head[i]), *(len(l[i]) for l in lines if i < len(l) and len(l) == len(head)))
              if any(len(l) == len(head) for l in lines) else len(head[i]) for i in range(len(head))]
    out = ["  ".join(h.rjust(w) for h, w in zip(head, widths))]
    for l in lines:
        if len(l) == len(head):
            out.append("  ".join(c.rjust(w) for c, w in zip(l, widths)))
        else:  # OOM / skipped: the status instead of the numbers
            out.append("  ".join(c.rjust(w) for c, w in zip(l[:3], widths)) + "  " + l[3])
    return "\n".join(out)


def write_csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else (round(r[k], 4) if isinstance(r[k], float) else r[k]))
                        for k in COLUMNS})


def plot(path: Path, rows: list[dict], meta: dict) -> str:
    """Throughput and peak memory against the number of classes; returns a message."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return f"matplotlib is not installed: skipped {path.name} (pip install matplotlib)"
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
    styles = {"softmax": ("full softmax", "tab:red"), "partial_fc": ("Partial FC", "tab:orange"),
              "dcq": ("DCQ", "tab:blue")}
    for method, (label, color) in styles.items():
        mine = [r for r in rows if r["method"] == method]
        ok = [r for r in mine if r.get("status") == "ok"]
        if ok:
            ax_t.plot([r["classes"] for r in ok], [r["samples_per_s"] for r in ok], "o-", color=color, label=label)
            if all(r.get("peak_mib") is not None for r in ok):
                ax_m.plot([r["classes"] for r in ok], [r["peak_mib"] / 1024 for r in ok], "o-", color=color,
                          label=label)
        failed = [r for r in mine if r.get("status") != "ok"]
        for r in failed:  # mark where it did not run
            ax_t.axvline(r["classes"], color=color, ls=":", lw=1)
            ax_t.annotate("OOM" if r["status"] == "OOM" else "skipped", (r["classes"], 0), xytext=(2, 4),
                          textcoords="offset points", rotation=90, color=color, fontsize=8, va="bottom")
    for r in rows:  # the reference steps, which have no head: horizontal lines
        if r["method"] in REFERENCES and r.get("status") == "ok":
            ax_t.axhline(r["samples_per_s"], color="gray", ls="--" if r["method"] == "backbone" else ":",
                         label="backbone only" if r["method"] == "backbone" else "backbone + weight generator")
    for ax in (ax_t, ax_m):
        ax.set_xscale("log")
        ax.set_xlabel("number of classes")
        ax.grid(True, which="both", alpha=0.3)
    ax_t.set_yscale("log")
    ax_t.set_ylabel("samples / s (median)")
    ax_m.set_yscale("log")
    ax_m.set_ylabel("peak memory growth (GiB)")
    ax_t.legend(fontsize=8)
    ax_m.legend(fontsize=8)
    hw = meta["hardware"].get("gpu") or meta["hardware"]["cpu"]
    st = meta["settings"]
    what = f"training step ({st['backbone']} backbone)" if st["mode"] == "end2end" else "loss-only step"
    fig.suptitle(f"{what}, batch {st['batch_size']}, {st['dtype']}, embedding {st['embedding_size']}, "
                 f"queue / sample {st['sample_rate']:.0%} - {hw}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"wrote {path}"


# --------------------------------------------------------------------------- main


def parse_classes(text: str) -> list[int]:
    out = []
    for part in text.split(","):
        part = part.strip()
        try:
            value = float(part)
        except ValueError:
            raise argparse.ArgumentTypeError(f"--classes takes numbers like 1e5,2e6; got {part!r}") from None
        if value < 1 or value != int(value):
            raise argparse.ArgumentTypeError(f"--classes must be positive integers, got {part!r}")
        out.append(int(value))
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Defaults by device: " + json.dumps(DEFAULTS))
    p.add_argument("--device", default=None, help="cpu or cuda[:i] (default: cuda if available, else cpu)")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="autocast dtype (default: fp16 on cuda, fp32 on cpu)")
    p.add_argument("--batch-size", type=int, help="samples per step")
    p.add_argument("--classes", type=parse_classes, help="comma-separated numbers of classes, e.g. 1e5,1e6")
    p.add_argument("--backbone", choices=BACKBONES, help="dcq_ops.training.backbones name")
    p.add_argument("--repeats", type=int, help="timed repeats (the median is reported)")
    p.add_argument("--warmup", type=int, help="untimed steps before timing")
    p.add_argument("--iters", type=int, help="steps per timed repeat")
    p.add_argument("--mode", choices=("end2end", "loss"), default="end2end",
                   help="end2end: backbone + head + optimizer; loss: the head alone on random embeddings")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {METHODS}")
    p.add_argument("--embedding-size", type=int, default=512)
    p.add_argument("--image-size", type=int, help="input side (default: 32 for small_cnn, else 112)")
    p.add_argument("--sample-rate", type=float, default=0.1,
                   help="DCQ queue and Partial FC sample, as a fraction of the classes")
    p.add_argument("--dcq-backend", default="auto", help="dcq_cross_entropy backend for the DCQ head")
    p.add_argument("--out", type=Path, help="output path without extension (default benchmarks/results/throughput_<device>[_loss])")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's own choice)")
    p.add_argument("--no-plot", action="store_true", help="do not write the PNG")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda given but torch sees no CUDA device")
    if device.type not in DEFAULTS:
        p.error(f"--device must be cpu or cuda, got {device}")
    defaults = DEFAULTS[device.type]
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, parse_classes(value) if key == "classes" else value)
    if args.image_size is None:
        args.image_size = 32 if args.backbone == "small_cnn" else 112
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in args.methods if m not in METHODS]
    if bad:
        p.error(f"--methods must be among {METHODS}, got {bad}")
    if args.mode == "loss":
        args.methods = [m for m in args.methods if m not in REFERENCES]
    if args.threads is not None and args.threads < 1:
        p.error(f"--threads must be >= 1, got {args.threads}")
    for name in ("batch_size", "repeats", "iters", "embedding_size", "image_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0:
        p.error(f"--warmup must be >= 0, got {args.warmup}")
    if not 0 < args.sample_rate <= 1:
        p.error(f"--sample-rate must be in (0, 1], got {args.sample_rate}")
    if args.out is None:
        args.out = RESULTS_DIR / f"throughput_{device.type}{'' if args.mode == 'end2end' else '_loss'}"
    return args, device


def warm_libraries(args, device: torch.device) -> None:
    """One untimed step of each method at a tiny size, so one-time costs (thread pools,
    kernel selection, lazy initialisation) land in no row's time or memory."""
    small = argparse.Namespace(**{**vars(args), "warmup": 0, "repeats": 1, "iters": 1})
    for method in args.methods:
        classes = None if method in REFERENCES else max(args.batch_size * 2, 16) * 10
        Step(method, classes, small, device).step()
    _sync(device)
    _release_memory(device)


def main(argv=None) -> dict:
    args, device = parse_args(argv)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise SystemExit("throughput.py measures one process; the distributed benchmark is not written yet")
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return _run(args, device)
    finally:  # main() may be called in-process (tests): leave the process as it was
        torch.set_num_threads(threads)
        gc.unfreeze()


def _run(args, device: torch.device) -> dict:
    if device.type == "cuda":
        torch.cuda.set_device(device)
    meta = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join(["benchmarks/throughput.py"] + args.argv),
        "device": str(device),
        "hardware": hardware(device),
        "versions": versions(),
        "dcq_backend": dcq_ops.select_backend(device, args.dcq_backend),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "memory_measure": ("torch.cuda.max_memory_allocated growth" if device.type == "cuda"
                           else "peak RSS growth (VmHWM reset per row)"),
    }
    hw = meta["hardware"]
    print(f"# device: {device} | " + (f"GPU {hw['gpu']} ({hw['gpu_memory_gib']} GiB) | " if "gpu" in hw else "")
          + f"CPU {hw['cpu']} x{hw['cpu_count']} ({hw['torch_threads']} torch threads), RAM {hw['ram_gib']} GiB")
    print("# versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items())
          + f" | DCQ backend: {meta['dcq_backend']}")
    print(f"# {args.mode}: batch {args.batch_size}, {args.dtype}, "
          + (f"backbone {args.backbone} ({args.image_size}px), " if args.mode == "end2end" else "")
          + f"embedding {args.embedding_size}, queue / sample {args.sample_rate:.0%} of the classes, "
          + f"warm-up {args.warmup}, {args.repeats} x {args.iters} timed steps (median)", flush=True)
    load = hw.get("load_average_1min")
    if device.type == "cpu" and load is not None and load > 0.5:
        print(f"# warning: load average {load} before the run: other processes share the CPU, "
              "timings will be noisy", flush=True)

    configs = [(m, None) for m in REFERENCES if m in args.methods]
    configs += [(m, c) for c in args.classes for m in HEADS if m in args.methods]
    t_start = time.perf_counter()
    warm_libraries(args, device)
    # Everything alive now (torch, its lazily imported modules) survives the run: keep it out
    # of the collections between rows, which otherwise cost ~0.5 s each after torch._dynamo.
    gc.freeze()
    rows = []
    for i, (method, classes) in enumerate(configs, 1):
        label = method + ("" if classes is None else f" @ {classes:,} classes")
        print(f"[{i}/{len(configs)}] {label} ...", end=" ", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        row = run_row(method, classes, args, device)
        rows.append(row)
        done = (f"{row['samples_per_s']:.1f} samples/s" if row["status"] == "ok" else row["status"])
        print(f"{done} ({time.perf_counter() - t0:.1f} s)", file=sys.stderr, flush=True)
    add_ratios(rows)
    meta["wall_s"] = round(time.perf_counter() - t_start, 1)

    print()
    print(format_table(rows))
    summary = summarize(rows)
    if summary:
        print("\n" + summary)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    csv_path, json_path, png_path = (args.out.with_name(args.out.name + ext) for ext in (".csv", ".json", ".png"))
    write_csv(csv_path, rows)
    with open(json_path, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    print(f"\nwrote {csv_path}\nwrote {json_path}")
    print(plot(png_path, rows, meta) if not args.no_plot else "--no-plot: no PNG")
    print(f"total {meta['wall_s']} s")
    return {"meta": meta, "rows": rows, "paths": {"csv": csv_path, "json": json_path, "png": png_path}}


def summarize(rows: list[dict]) -> str:
    """DCQ against the full softmax at the largest number of classes where both ran."""
    ok = {(r["method"], r["classes"]): r for r in rows if r.get("status") == "ok"}
    both = sorted(c for (m, c) in ok if m == "dcq" and ("softmax", c) in ok)
    lines = []
    if both:
        c = both[-1]
        d, s = ok[("dcq", c)], ok[("softmax", c)]
        mem = (f", peak memory {d['peak_mib'] / s['peak_mib']:.3f}x" if d.get("peak_mib") and s.get("peak_mib")
               else "")
        lines.append(f"at {c:,} classes DCQ runs at {d['samples_per_s'] / s['samples_per_s']:.2f}x the full "
                     f"softmax's throughput{mem}")
    dcq = [r for (m, _), r in sorted(ok.items(), key=lambda kv: kv[0][1] or 0) if m == "dcq"]
    for ref, what in (("backbone", "the backbone-only step"),
                      ("backbone_gen", "the backbone + weight generator step (DCQ without its loss)")):
        if dcq and (ref, None) in ok:
            lines.append(f"at {dcq[-1]['classes']:,} classes DCQ runs at "
                         f"{dcq[-1]['samples_per_s'] / ok[(ref, None)]['samples_per_s']:.0%} of {what}")
    beyond = [r["classes"] for r in rows if r["method"] == "softmax" and r.get("status") != "ok"
              and ("dcq", r["classes"]) in ok]
    if beyond:
        lines.append("full softmax did not run at " + ", ".join(f"{c:,}" for c in beyond)
                     + " classes; DCQ did")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
