"""The machine's fp32 GEMM rate through every GEMM provider a benchmark can reach
here, on square and on loss-shaped products: the roofline that a CPU loss is held
to (benchmarks/kernels.py reports the fused loss as a fraction of the best).

Providers (each only where it exists):

- ``torch.mm``: ATen's BLAS, MKL in torch's x86 builds. MKL runs its AVX2 kernels
  on AMD processors and wherever ``MKL_ENABLE_INSTRUCTIONS`` limits it.
- ``numpy``: numpy's BLAS (OpenBLAS with kernels per microarchitecture in the PyPI
  wheels: ``numpy_blas()`` names it).
- ``onednn``: oneDNN's fp32 matmul inside torch (``torch.ops.mkldnn._linear_pointwise``,
  inductor's CPU linear), which picks its kernels from the CPU's instruction sets.

Shapes: square 2048³ and 4096³; the loss's two products for N rows, D dims and a
chunk of 8192 queue slots, ``q Wᵀ`` (N × D × 8192) and ``P W`` (N × 8192 × D). Each
provider gets its preferred operand layout, prepared outside the timing. Rates are
2·M·N·K / median seconds, in GFLOP/s, with all of torch's threads (numpy's BLAS
uses its own pool, by default as many threads as cores).
"""

from __future__ import annotations

import numpy as np
import torch

from common import time_stable

CHUNK = 8192


def numpy_blas() -> str:
    """numpy's BLAS as numpy describes it, e.g. 'scipy-openblas 0.3.31 (SkylakeX)'."""
    try:
        blas = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
    except Exception:  # noqa: BLE001 - older numpy: no dict mode
        return "numpy's BLAS"
    return f"{blas.get('name', '?')} {blas.get('version', '')}".strip()


def shapes(rows: int, dim: int) -> list[tuple[str, int, int, int, str]]:
    """(label, M, K, N, layout): C[M, N] = A[M, K] B[K, N]; layout "nt" when B is
    stored as [N, K] rows (q Wᵀ: W's rows), "nn" when as [K, N] (P W)."""
    return [("square", 2048, 2048, 2048, "nn"), ("square", 4096, 4096, 4096, "nn"),
            ("q Wᵀ", rows, dim, CHUNK, "nt"), ("P W", rows, CHUNK, dim, "nn")]


def providers() -> list[str]:
    names = ["torch.mm", "numpy"]
    if torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        names.append("onednn")
    return names


def product(provider: str, m: int, k: int, n: int, layout: str, seed: int = 0):
    """A zero-argument function computing one C = A B through ``provider``."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(m, k, generator=g)
    b_rows = torch.randn(n, k, generator=g) if layout == "nt" else torch.randn(k, n, generator=g).t()
    # b_rows: [n, k], the layout a linear layer (oneDNN) takes; b = its transpose, [k, n]
    b_rows = b_rows.contiguous()
    out = torch.empty(m, n)
    if provider == "torch.mm":
        b = b_rows.t() if layout == "nt" else b_rows.t().contiguous()
        return lambda: torch.mm(a, b, out=out)
    if provider == "numpy":
        an, on = a.numpy(), out.numpy()
        bn = b_rows.numpy().T if layout == "nt" else np.ascontiguousarray(b_rows.numpy().T)
        return lambda: np.matmul(an, bn, out=on)
    if provider == "onednn":
        return lambda: torch.ops.mkldnn._linear_pointwise(a, b_rows, None, "none", [], "")
    raise ValueError(f"unknown GEMM provider {provider!r}; choose from {', '.join(providers())}")


def measure(rows: int, dim: int, *, warmup: int = 1, budget_s: float = 2.0, log=print) -> list[dict]:
    """Every provider on every shape: records with provider, shape, M, K, N, gflops
    (None when the provider failed), and the timing fields."""
    records = []
    for label, m, k, n, layout in shapes(rows, dim):
        for provider in providers():
            record = dict(kind="gemm_rate", provider=provider, shape=f"{label} {m}x{k}x{n}", M=m, K=k, N=n,
                          gflops=None, status="ok")
            try:
                fn = product(provider, m, k, n, layout)
                timing = time_stable(fn, "cpu", warmup=warmup, budget_s=budget_s)
                record.update(timing.fields(), gflops=2.0 * m * k * n / timing.median_s / 1e9)
            except Exception as exc:  # noqa: BLE001 - a provider that fails is reported, not fatal
                record["status"] = f"error: {exc.__class__.__name__}: {str(exc).splitlines()[0][:200]}"
            log(f"{provider:<9} {record['shape']:<22} "
                + (f"{record['gflops']:8.1f} GFLOP/s" if record["gflops"] else record["status"]), flush=True)
            records.append(record)
            fn = None
    return records


def best(records: list[dict]) -> dict | None:
    """The fastest stable measurement (any provider, any shape), or the fastest at all."""
    timed = [r for r in records if r.get("gflops")]
    stable = [r for r in timed if r.get("stable")]
    pool = stable or timed
    return max(pool, key=lambda r: r["gflops"]) if pool else None
