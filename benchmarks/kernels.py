#!/usr/bin/env python
"""Forward + backward time and peak extra memory of the DCQ loss backends,
against the plain GEMMs of the same shape (the roofline).

    python benchmarks/kernels.py                  # GPU: N in {128, 512, 4096}, K in {2^16, 2^18, 2^20}, bf16
                                                  # CPU: N in {64, 256, 1024}, K in {10^4, 10^5}, fp32
    python benchmarks/kernels.py --rows 512 --slots 262144 --dim 512 --dtype bf16
    python benchmarks/kernels.py --out /tmp/kernels.json --budget-s 240

Rows of the table, for each shape (N embeddings, K queue slots, D dims):

- ``gemm``: the two plain GEMMs a fused loss cannot avoid, q @ W^T ([N, K]) then
  P @ W ([N, D]), in the benchmark dtype: 4·N·K·D FLOPs, with the N×K product
  in memory between them. Their time is the limit of a one-pass loss through
  the same BLAS; ``gemm_fraction`` of a backend = gemm time / backend time (a
  fused backend that keeps its tiles in cache can beat it, > 1).
- ``triton``, ``chunked``, ``reference``: dcq_cross_entropy with that backend
  (ArcFace, s = 64, m2 = 0.5), forward + backward to the embeddings.
- ``chunked_aten``, ``chunked_avx512`` (CPU): ``chunked`` with its fp32 tile GEMMs
  from that provider (dcq_ops.set_cpu_gemm_provider), side by side with the
  process's own choice (``chunked``, whose provider the header names).
- CPU, fp32: first the machine's fp32 GEMM rate through every provider reachable
  here (benchmarks/gemm_rates.py: torch.mm, numpy's BLAS, oneDNN; square and
  loss-shaped products); ``of best`` of a backend = its FLOP rate / the best of
  those rates (``best_gemm_fraction``; the rate records come first in the JSON,
  with ``kind: gemm_rate``). ``--no-gemm-rates`` skips them.
- ``reference_compile``: the reference under torch.compile (default automatic
  dynamic shapes: the second shape recompiles once for all the following;
  compilation happens in the warm-up and is not timed).
- ``liger``, ``cce``: Liger-Kernel's fused linear cross-entropy and Apple's
  cut-cross-entropy on the same shapes, without margin or queue mask (logits
  s·q·W^T, targets in [0, K)), when they are installed and on CUDA.

Timing (benchmarks/common.py, ``time_stable``): ``--warmup`` runs
(compilation, autotuning), then timed repeats (CUDA events on a GPU), at least
``--min-repeats`` and at most ``--max-repeats``, until the median has settled
(its ~95% interval within 2.5%) or ``--row-budget-s`` of repeats is spent.
``ms_fwd_bwd`` is the median; ``min_ms`` / ``max_ms``, ``spread`` (middle half
of the repeats over the median), ``samples`` and ``stable`` come with it. A
noisy row (too spread or too few repeats to trust) is marked ``~`` in the
table, and so are the ratios computed from it. Peak extra memory
(common.PeakMemory): on CUDA ``max_memory_allocated`` during one step minus
what was allocated before it (inputs excluded); on CPU the growth of the peak
resident set size (VmHWM, reset through /proc/self/clear_refs; empty where
that is not possible).

A configuration that runs out of memory is recorded as "OOM" and the run goes
on; ``--budget-s`` skips what remains once the budget is spent. Output: a table
on stdout with the device, and the records as a JSON list in
benchmarks/results/kernels_<device>.json (or ``--out``): a list, not a dict with
a ``meta`` block, because scripts/gpu_check.sh reads it as one; every record
carries the device and the versions instead.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import dcq_ops
from dcq_ops import reference
from dcq_ops.backends import why_unavailable

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gemm_rates  # noqa: E402
from common import (DTYPES, MIB, NOISY_LEGEND, NOISY_MARK, RESULTS_DIR, cpu_model, is_oom, peak_bytes,  # noqa: E402
                    release_memory, time_stable, versions as harness_versions, write_json)

MARGIN = dict(scale=64.0, m1=1.0, m2=0.5, m3=0.0)
BACKENDS = ("gemm", "triton", "chunked", "chunked_aten", "chunked_avx512", "reference", "reference_compile", "liger",
            "cce")
CPU_GEMM_BACKENDS = {"chunked_aten": "aten", "chunked_avx512": "avx512"}  # backend -> CPU GEMM provider


# ----------------------------------------------------------------------------
# What is measured


def make_inputs(rows, slots, dim, dtype, device, seed=0):
    """Embeddings, class weights, labels, a unit-norm queue and its labels:
    K slots = 10% of 10·K classes, 1% of the slots empty."""
    g = torch.Generator(device=device).manual_seed(seed)
    classes = 10 * slots
    x = torch.randn(rows, dim, device=device, generator=g)
    k = 0.7 * x + torch.randn(rows, dim, device=device, generator=g)
    y = torch.randint(0, classes, (rows,), device=device, generator=g)
    w = F.normalize(torch.randn(slots, dim, device=device, generator=g), dim=1)
    yq = torch.randint(0, classes, (slots,), device=device, generator=g)
    yq[torch.rand(slots, device=device, generator=g) < 0.01] = -1
    return x.to(dtype), k.to(dtype), y, w.to(dtype), yq


def gemm_step(x, w):
    """The loss's two GEMMs in the input dtype, over K in chunks of at most
    2^28 logits (so that the roofline never needs more memory than a backend)."""
    rows, slots = x.shape[0], w.shape[0]
    chunk = max(1, min(slots, (1 << 28) // max(rows, 1)))

    def step():
        for start in range(0, slots, chunk):
            wc = w[start:start + chunk]
            logits = x @ wc.t()
            logits @ wc

    return step


def loss_step(backend, inputs, compiled=None):
    x, k, y, w, yq = inputs
    x = x.detach().requires_grad_(True)

    def step():
        x.grad = None
        if backend == "reference_compile":
            loss = compiled(x, k, y, w, yq, **MARGIN)
        else:
            loss = dcq_ops.dcq_cross_entropy(x, k, y, w, yq, **MARGIN, backend=backend)
        loss.backward()

    return step


def liger_step(inputs):
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    x, _, _, w, _ = inputs
    x = x.detach().requires_grad_(True)
    targets = torch.randint(0, w.shape[0], (x.shape[0],), device=x.device)
    loss_fn = LigerFusedLinearCrossEntropyLoss()

    def step():
        x.grad = None
        loss_fn(w, MARGIN["scale"] * F.normalize(x, dim=1), targets).backward()

    return step


def cce_step(inputs):
    from cut_cross_entropy import linear_cross_entropy

    x, _, _, w, _ = inputs
    x = x.detach().requires_grad_(True)
    targets = torch.randint(0, w.shape[0], (x.shape[0],), device=x.device)

    def step():
        x.grad = None
        linear_cross_entropy(MARGIN["scale"] * F.normalize(x, dim=1), w, targets).backward()

    return step


def unavailable(backend: str, device: torch.device, dtype: torch.dtype) -> str | None:
    """Why `backend` cannot run here, or None."""
    if backend == "triton" and device.type == "cpu":
        return "CPU tensors run only in Triton's interpreter, not worth timing"
    if backend in CPU_GEMM_BACKENDS:
        if device.type != "cpu":
            return "a CPU GEMM provider"
        if CPU_GEMM_BACKENDS[backend] not in dcq_ops.cpu_gemm_providers():
            return f"this CPU cannot run the {CPU_GEMM_BACKENDS[backend]} GEMMs"
        return why_unavailable("chunked", device)
    if backend in ("triton", "chunked"):
        return why_unavailable(backend, device)
    if backend in ("liger", "cce"):
        if device.type != "cuda":
            return "CUDA only"
        module = "liger_kernel" if backend == "liger" else "cut_cross_entropy"
        try:
            __import__(module)
        except Exception as exc:  # ImportError, or a broken install
            return f"{module} not importable ({exc.__class__.__name__})"
        if backend == "cce" and dtype == torch.float32:
            return "cut-cross-entropy needs fp16/bf16"
    return None


# ----------------------------------------------------------------------------
# Driver


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {cpu_model()} x{os.cpu_count()}"


def device_slug(device: torch.device) -> str:
    if device.type != "cuda":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "_", torch.cuda.get_device_name(device).lower()).strip("_")


def parse_list(text: str) -> list[int]:
    return [int(float(v)) for v in text.split(",") if v.strip()]


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rows", type=parse_list, help="N values (default: 128,512,4096 on GPU; 64,256,1024 on CPU)")
    parser.add_argument("--slots", type=parse_list,
                        help="K values (default: 65536,262144,1048576 on GPU; 10000,100000 on CPU)")
    parser.add_argument("--dim", type=int, help="D (default: 512)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="inputs and queue (default: bf16 on GPU, fp32 on CPU)")
    parser.add_argument("--backends", default=",".join(BACKENDS), help=f"subset of {','.join(BACKENDS)}")
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs before timing")
    parser.add_argument("--min-repeats", type=int, default=3, help="fewest timed repeats per row")
    parser.add_argument("--max-repeats", type=int, default=50, help="most timed repeats per row")
    parser.add_argument("--row-budget-s", type=float, default=2.0,
                        help="seconds of timed repeats per row, after which no repeat is started")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="skip what remains once this many seconds have passed")
    parser.add_argument("--out", type=Path, help="JSON output (default: benchmarks/results/kernels_<device>.json)")
    parser.add_argument("--no-gemm-rates", action="store_true",
                        help="CPU: skip measuring every GEMM provider's rate (and the 'of best' column)")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    rows_list = args.rows or ([128, 512, 4096] if on_gpu else [64, 256, 1024])
    slots_list = args.slots or ([1 << 16, 1 << 18, 1 << 20] if on_gpu else [10_000, 100_000])
    dim = args.dim or 512
    dtype_name = args.dtype or ("bf16" if on_gpu else "fp32")
    dtype = DTYPES[dtype_name]
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    for b in backends:
        if b not in BACKENDS:
            parser.error(f"unknown backend {b!r}; choose from {', '.join(BACKENDS)}")
    if "gemm" not in backends:
        backends.insert(0, "gemm")  # every fraction is relative to it

    name = device_name(device)
    found = harness_versions()
    versions = dict(torch=found["torch"], threads=torch.get_num_threads(),
                    cpu_epilogue=dcq_ops.cpu_capability(), triton=found["triton"])
    if not on_gpu:
        versions.update(cpu_gemm=dcq_ops.cpu_gemm_provider(), cpu_gemm_probe=dcq_ops.cpu_gemm_probe(),
                        mkl_enable_instructions=os.environ.get("MKL_ENABLE_INSTRUCTIONS"))
    print(f"# device: {name} | torch {versions['torch']} | triton {versions['triton']} | "
          f"{versions['threads']} torch threads | CPU epilogue {versions['cpu_epilogue']} | "
          f"dtype {dtype_name} | D={dim} | margin {MARGIN}", flush=True)
    if not on_gpu:
        probe = (", ".join(f"{p} {rate:.0f}" for p, rate in versions["cpu_gemm_probe"].items()) + " GFLOP/s a thread"
                 if versions["cpu_gemm_probe"] else "named, not probed")
        print(f"# CPU GEMM provider of chunked: {versions['cpu_gemm']} (probe: {probe}) | "
              f"MKL_ENABLE_INSTRUCTIONS={versions['mkl_enable_instructions'] or 'unset'}", flush=True)

    out = args.out or RESULTS_DIR / f"kernels_{device_slug(device)}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    compiled = None
    started = time.monotonic()
    records = []
    best_rate = None
    if not on_gpu and dtype == torch.float32 and not args.no_gemm_rates:
        print(f"# fp32 GEMM rates, every provider (numpy: {gemm_rates.numpy_blas()})", flush=True)
        rate_records = gemm_rates.measure(max(rows_list), dim, warmup=args.warmup, budget_s=args.row_budget_s)
        for r in rate_records:
            r.update(device=name, **versions)
        records.extend(rate_records)
        best_rate = gemm_rates.best(rate_records)
        if best_rate is not None:
            print(f"# best fp32 GEMM rate: {best_rate['gflops']:.1f} GFLOP/s ({best_rate['provider']}, "
                  f"{best_rate['shape']}); 'of best' below is a backend's rate over it", flush=True)
    header = (f"{'backend':<18} {'N':>6} {'K':>9} {'ms fwd+bwd':>11} {'min-max ms':>15} {'spread':>6} {'n':>3} "
              f"{'TFLOP/s':>8} {'of GEMM':>8} {'of best':>8} {'vs ref':>7} {'peak MiB':>9}  status")
    print(header)
    print("-" * len(header), flush=True)
    for rows in rows_list:
        for slots in slots_list:
            flops = 4.0 * rows * slots * dim
            inputs = make_inputs(rows, slots, dim, dtype, device)
            shape_records = []
            for backend in backends:
                record = dict(device=name, backend=backend, dtype=dtype_name, N=rows, K=slots, D=dim,
                              ms_fwd_bwd=None, peak_extra_mib=None, tflops=None, gemm_fraction=None,
                              best_gemm_fraction=None, speedup_vs_reference=None, status="ok", **versions)
                reason = unavailable(backend, device, dtype)
                if args.budget_s is not None and time.monotonic() - started > args.budget_s:
                    reason = "skipped: time budget spent"
                if reason is not None:
                    record["status"] = reason if reason.startswith("skipped") else f"unavailable: {reason}"
                else:
                    try:
                        if backend == "gemm":
                            step = gemm_step(inputs[0], inputs[3])
                        elif backend == "liger":
                            step = liger_step(inputs)
                        elif backend == "cce":
                            step = cce_step(inputs)
                        elif backend in CPU_GEMM_BACKENDS:
                            dcq_ops.set_cpu_gemm_provider(CPU_GEMM_BACKENDS[backend])
                            step = loss_step("chunked", inputs)
                        else:
                            if backend == "reference_compile" and compiled is None:
                                compiled = torch.compile(reference.dcq_cross_entropy)
                            step = loss_step(backend, inputs, compiled)
                        timing = time_stable(step, device, warmup=args.warmup, min_samples=args.min_repeats,
                                             max_samples=args.max_repeats, budget_s=args.row_budget_s)
                        ms = 1e3 * timing.median_s
                        record.update(timing.fields(), ms_fwd_bwd=ms, tflops=flops / (ms * 1e-3) / 1e12)
                        extra = peak_bytes(step, device)
                        record["peak_extra_mib"] = None if extra is None else extra / MIB
                    except Exception as exc:  # noqa: BLE001 - record and go on
                        if is_oom(exc):
                            record["ms_fwd_bwd"] = "OOM"
                            record["status"] = "OOM"
                        else:
                            record["status"] = f"error: {exc.__class__.__name__}: {str(exc).splitlines()[0][:200]}"
                    finally:
                        step = None
                        if backend in CPU_GEMM_BACKENDS:  # back to the process's own choice
                            dcq_ops.set_cpu_gemm_provider(versions["cpu_gemm"])
                        release_memory(device)
                shape_records.append(record)

            timed = {r["backend"]: r for r in shape_records if isinstance(r["ms_fwd_bwd"], float)}
            for record in shape_records:
                ms = record["ms_fwd_bwd"]
                if isinstance(ms, float):
                    for key, ref in (("gemm_fraction", "gemm"), ("speedup_vs_reference", "reference")):
                        if ref in timed:
                            record[key] = timed[ref]["ms_fwd_bwd"] / ms
                            # a ratio is noise when either of its two measurements is
                            record[key + "_stable"] = record["stable"] and timed[ref]["stable"]
                    if best_rate is not None:
                        record["best_gemm_fraction"] = record["tflops"] * 1e3 / best_rate["gflops"]
                        record["best_gemm_fraction_stable"] = record["stable"] and bool(best_rate.get("stable"))
                print(format_row(record), flush=True)
            records.extend(shape_records)
            # Written after every shape: a run killed by a timeout keeps what it measured.
            write_json(out, records)
            del inputs
            release_memory(device)

    if any(r.get("stable") is False for r in records):
        print("# " + NOISY_LEGEND)
    print(f"# {len(records)} records -> {out} ({time.monotonic() - started:.0f} s)")
    return records


def format_row(r: dict) -> str:
    def num(value, fmt, stable=True):
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            return "-"
        return ("" if stable else NOISY_MARK) + format(value, fmt)

    ms = r["ms_fwd_bwd"]
    timed = isinstance(ms, float)
    ms_text = num(ms, ".3f", r.get("stable", True)) if timed else str(ms or "-")
    span = f"{r['min_ms']:.3f}-{r['max_ms']:.3f}" if timed else "-"
    spread, n = (f"{100 * r['spread']:.0f}%", str(r["samples"])) if timed else ("-", "-")
    ratio = {k: num(r.get(k), ".2f", r.get(k + "_stable", True))
             for k in ("gemm_fraction", "best_gemm_fraction", "speedup_vs_reference")}
    return (f"{r['backend']:<18} {r['N']:>6} {r['K']:>9} {ms_text:>11} {span:>15} {spread:>6} {n:>3} "
            f"{num(r['tflops'], '.3g'):>8} {ratio['gemm_fraction']:>8} {ratio['best_gemm_fraction']:>8} "
            f"{ratio['speedup_vs_reference']:>7} "
            f"{num(r['peak_extra_mib'], '.1f'):>9}  {r['status'] if r['status'] != 'ok' else ''}")


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
