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

Timing (benchmarks/common.py, ``time_stable``): ``--warmup`` untimed steps, then timed
repeats of ``--iters`` steps each (device synchronised around each repeat), at least
``--repeats`` of them and more, up to ``--max-repeats``, until the median has settled (its
~95% interval within 2.5%) or the row's ``--budget-s`` of timed repeats is spent. The table
gives the median with min-max, the spread of the middle half of the repeats and their
number; a row whose repeats are too spread or too few to trust is marked ``~`` (``stable``
false in the CSV / JSON): noise, not a result. (Before the harness, ``--repeats`` was the
exact number of repeats; ``--repeats N --max-repeats N`` still gives exactly N.)

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
import gc
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

import dcq_ops
from dcq_ops.training.backbones import BACKBONES

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (DTYPES, GIB, MIB, NOISY_LEGEND, NOISY_MARK, RESULTS_DIR, PeakMemory,  # noqa: E402
                    available_ram, describe, format_table as _table, is_oom, meta as make_meta,
                    pyplot, release_memory, synchronize, time_stable, warn_if_loaded, write_csv, write_json)
from throughput_steps import HEADS, METHODS, REFERENCES, Step, estimate_peak_bytes  # noqa: E402

# Embedded defaults, by device type. The CPU default spans two decades of classes in a
# few minutes on two cores: fast rows stop when their median settles (a second or two),
# slow or noisy ones at the per-row budget. 20 s keeps a loaded machine's worst case
# (every row at its budget) near four minutes, and the slowest row (the full softmax at
# 10^6 classes, ~10 s a step) still gets 3 repeats: the minimum is taken while the budget
# is not yet spent.
DEFAULTS = {
    "cpu": dict(classes="1e4,1e5,1e6", batch_size=64, backbone="small_cnn", dtype="fp32",
                repeats=3, max_repeats=50, budget_s=20.0, warmup=1, iters=1),
    "cuda": dict(classes="1e5,1e6,2e6,4e6,1e7", batch_size=128, backbone="iresnet50", dtype="fp16",
                 repeats=5, max_repeats=50, budget_s=30.0, warmup=3, iters=5),
}


# --------------------------------------------------------------------------- one row


def measure(method: str, classes: int | None, args, device: torch.device) -> dict:
    """Build, warm up, time one row. Raises torch.OutOfMemoryError when it does not fit."""
    with PeakMemory(device) as peak:
        bench = Step(method, classes, args, device)
        timing = time_stable(bench.step, device, warmup=args.warmup, inner=args.iters, min_samples=args.repeats,
                             max_samples=args.max_repeats, budget_s=args.budget_s)
        peak_bytes = peak.read()
        state = bench.state()
        del bench
    return dict(status="ok", step_ms=1e3 * timing.median_s, step_ms_min=1e3 * timing.min_s,
                step_ms_max=1e3 * timing.max_s, samples_per_s=args.batch_size / timing.median_s,
                peak_mib=None if peak_bytes is None else peak_bytes / MIB, state_mib=state / MIB,
                **timing.fields())


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
        if not is_oom(exc):
            raise
        row["status"] = "OOM"
    finally:
        release_memory(device)
    return row


# --------------------------------------------------------------------------- reporting

COLUMNS = ["mode", "method", "classes", "queue_or_sample", "status", "samples_per_s", "step_ms", "step_ms_min",
           "step_ms_max", "vs_softmax", "vs_backbone", "peak_mib", "mem_vs_softmax", "state_mib", "batch_size",
           "dtype", "backbone", "spread", "samples", "stable"]


def _stable(r: dict) -> bool:
    return r.get("stable", True)  # rows without timing fields (tests' stand-ins) count as stable


def add_ratios(rows: list[dict]) -> None:
    """Throughput and memory ratios against the full softmax at the same number of classes
    and throughput against the backbone-only step, all from this run. A ratio is noisy
    (``<ratio>_stable`` false) when either of its two rows is."""
    softmax = {r["classes"]: r for r in rows if r["method"] == "softmax" and r.get("status") == "ok"}
    backbone = next((r for r in rows if r["method"] == "backbone" and r.get("status") == "ok"), None)
    for r in rows:
        for key in ("vs_softmax", "vs_backbone", "mem_vs_softmax"):
            r.setdefault(key, None)
        if r.get("status") != "ok":
            continue
        ref = softmax.get(r["classes"])
        if ref is not None:
            r["vs_softmax"] = r["samples_per_s"] / ref["samples_per_s"]
            r["vs_softmax_stable"] = _stable(r) and _stable(ref)
            if r.get("peak_mib") and ref.get("peak_mib"):
                r["mem_vs_softmax"] = r["peak_mib"] / ref["peak_mib"]
        if backbone is not None:
            r["vs_backbone"] = r["samples_per_s"] / backbone["samples_per_s"]
            r["vs_backbone_stable"] = _stable(r) and _stable(backbone)


def _fmt(v, spec=".1f", stable=True) -> str:
    if v is None:
        return "-"
    return ("" if stable else NOISY_MARK) + (format(v, spec) if isinstance(v, float) else str(v))


def format_table(rows: list[dict]) -> str:
    head = ["method", "classes", "K/S", "samples/s", "ms/step", "min-max ms", "spread", "n", "x softmax",
            "x backbone", "peak MiB", "mem x softmax", "state MiB"]
    lines = []
    for r in rows:
        cells = [r["method"], f"{r['classes']:,}" if r["classes"] else "-", _fmt(r["queue_or_sample"])]
        if r.get("status") != "ok":  # OOM / skipped: the status instead of the numbers
            lines.append(cells + [r["status"]])
            continue
        if "median_ms" in r:
            timing = [_fmt(r["step_ms"], stable=_stable(r)), f"{r['min_ms']:.1f}-{r['max_ms']:.1f}",
                      f"{100 * r['spread']:.0f}%", str(r["samples"])]
        else:
            timing = [_fmt(r["step_ms"]), "-", "-", "-"]
        lines.append(cells + [_fmt(r["samples_per_s"], stable=_stable(r))] + timing
                     + [_fmt(r["vs_softmax"], ".2f", r.get("vs_softmax_stable", True)),
                        _fmt(r["vs_backbone"], ".2f", r.get("vs_backbone_stable", True)),
                        _fmt(r["peak_mib"], ".0f"), _fmt(r["mem_vs_softmax"], ".3f"), _fmt(r["state_mib"], ".0f")])
    return _table(head, lines)


def plot(path: Path, rows: list[dict], meta: dict) -> str:
    """Throughput (median, min-max bars; noisy points hollow) and peak memory against the
    number of classes; returns a message."""
    plt = pyplot()
    if plt is None:
        return f"skipped {path.name}"
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
    styles = {"softmax": ("full softmax", "tab:red"), "partial_fc": ("Partial FC", "tab:orange"),
              "dcq": ("DCQ", "tab:blue")}
    for method, (label, color) in styles.items():
        mine = [r for r in rows if r["method"] == method]
        ok = [r for r in mine if r.get("status") == "ok"]
        if ok:
            x = [r["classes"] for r in ok]
            y = [r["samples_per_s"] for r in ok]
            bars = [[y_ - r["batch_size"] / (r.get("step_ms_max", r["step_ms"]) / 1e3) for y_, r in zip(y, ok)],
                    [r["batch_size"] / (r.get("step_ms_min", r["step_ms"]) / 1e3) - y_ for y_, r in zip(y, ok)]]
            ax_t.errorbar(x, y, yerr=bars, fmt="-", color=color, label=label, capsize=2)
            for xi, yi, r in zip(x, y, ok):
                ax_t.plot(xi, yi, "o", color=color, mfc=color if _stable(r) else "white")
            if all(r.get("peak_mib") is not None for r in ok):
                ax_m.plot(x, [r["peak_mib"] / 1024 for r in ok], "o-", color=color, label=label)
        for r in (r for r in mine if r.get("status") != "ok"):  # mark where it did not run
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
    ax_t.set_ylabel("samples / s (median; bars min-max; hollow: noisy)")
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
    p.add_argument("--repeats", type=int,
                   help="fewest timed repeats per row (more until the median settles; see --max-repeats)")
    p.add_argument("--max-repeats", type=int, help="most timed repeats per row")
    p.add_argument("--budget-s", type=float,
                   help="seconds of timed repeats per row, after which no repeat is started")
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
    args.max_repeats = max(args.max_repeats, args.repeats)
    if args.budget_s <= 0:
        p.error(f"--budget-s must be > 0, got {args.budget_s}")
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
    synchronize(device)
    release_memory(device)


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
    # Who computes the CPU loss's fp32 GEMMs (chosen once per process, on this call).
    cpu_gemm = dcq_ops.cpu_gemm_provider() if device.type == "cpu" else None
    meta = make_meta(
        "throughput.py", args.argv, device, dcq_backend=dcq_ops.select_backend(device, args.dcq_backend),
        cpu_gemm=cpu_gemm, cpu_gemm_probe=dcq_ops.cpu_gemm_probe() if cpu_gemm else None,
        settings={k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        memory_measure=("torch.cuda.max_memory_allocated growth" if device.type == "cuda"
                        else "peak RSS growth (VmHWM reset per row)"),
        timing=(f"median of >= {args.repeats} and <= {args.max_repeats} repeats of {args.iters} step(s) after "
                f"{args.warmup} warm-up step(s), until settled or {args.budget_s:g} s of repeats per row"))
    print(describe(meta) + f" | DCQ backend: {meta['dcq_backend']}"
          + (f" | CPU GEMM provider: {cpu_gemm}" if cpu_gemm else ""))
    print(f"# {args.mode}: batch {args.batch_size}, {args.dtype}, "
          + (f"backbone {args.backbone} ({args.image_size}px), " if args.mode == "end2end" else "")
          + f"embedding {args.embedding_size}, queue / sample {args.sample_rate:.0%} of the classes, "
          + f"timing: {meta['timing']}", flush=True)
    if device.type == "cpu":
        warn_if_loaded()

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
        done = (f"{'' if _stable(row) else NOISY_MARK}{row['samples_per_s']:.1f} samples/s"
                if row["status"] == "ok" else row["status"])
        print(f"{done} ({time.perf_counter() - t0:.1f} s)", file=sys.stderr, flush=True)
    add_ratios(rows)
    meta["wall_s"] = round(time.perf_counter() - t_start, 1)

    print()
    print(format_table(rows))
    if not all(_stable(r) for r in rows if r.get("status") == "ok"):
        print(NOISY_LEGEND)
    summary = summarize(rows)
    if summary:
        print("\n" + summary)
    csv_path, json_path, png_path = (args.out.with_name(args.out.name + ext) for ext in (".csv", ".json", ".png"))
    write_csv(csv_path, rows, COLUMNS)
    write_json(json_path, {"rows": rows}, meta)
    print(f"\nwrote {csv_path}\nwrote {json_path}")
    print(plot(png_path, rows, meta) if not args.no_plot else "--no-plot: no PNG")
    print(f"total {meta['wall_s']} s")
    return {"meta": meta, "rows": rows, "paths": {"csv": csv_path, "json": json_path, "png": png_path}}


def _noisy(*rows: dict) -> str:
    return "" if all(_stable(r) for r in rows) else " (noisy: not a result)"


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
                     f"softmax's throughput{mem}{_noisy(d, s)}")
    dcq = [r for (m, _), r in sorted(ok.items(), key=lambda kv: kv[0][1] or 0) if m == "dcq"]
    for ref, what in (("backbone", "the backbone-only step"),
                      ("backbone_gen", "the backbone + weight generator step (DCQ without its loss)")):
        if dcq and (ref, None) in ok:
            lines.append(f"at {dcq[-1]['classes']:,} classes DCQ runs at "
                         f"{dcq[-1]['samples_per_s'] / ok[(ref, None)]['samples_per_s']:.0%} of {what}"
                         + _noisy(dcq[-1], ok[(ref, None)]))
    beyond = [r["classes"] for r in rows if r["method"] == "softmax" and r.get("status") != "ok"
              and ("dcq", r["classes"]) in ok]
    if beyond:
        lines.append("full softmax did not run at " + ", ".join(f"{c:,}" for c in beyond)
                     + " classes; DCQ did")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
