#!/usr/bin/env python
"""The accuracy cost of 16-bit GEMM operands, measured on the CPU.

    python benchmarks/precision.py                 # s=64, D=512, K=100,000, N=256 (about a minute)
    python benchmarks/precision.py --rows 64 --slots 20000

The GPU default keeps the queue in bf16 and runs both GEMMs of the loss with
bf16 operands (fp32 accumulation). The chunked backend does the same rounding on
the CPU (the queue stored in the dtype, the normalised embeddings and the
probabilities rounded to it before the GEMMs, which accumulate in fp32), so the
cost can be measured here, without a GPU. For a queue stored in fp32, bf16 and
fp16, against the float64 reference on the unrounded (fp32) queue:

- the loss: the error of the mean loss, and the largest error of a row's loss;
- the gradient: per row ||g - g_exact|| / ||g_exact||, its median and maximum.

Inputs (seeded): ArcFace (s = 64, m = 0.5, exact gradient); unit queue rows of
random identities; embeddings whose own class weight has cosine about 0.7 with
them, and 5% of the queue made hard negatives (cosine about 0.4 with some
embedding). Writes benchmarks/results/precision_cpu.json and prints a table.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import dcq_ops  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cpu_model, meta, write_json  # noqa: E402

OUT = Path(__file__).resolve().parent / "results" / "precision_cpu.json"
MARGIN = dict(scale=64.0, m1=1.0, m2=0.5, m3=0.0)


def make_inputs(rows: int, slots: int, dim: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, dim, generator=g, dtype=torch.float64)
    q = F.normalize(x, dim=1)
    k = q + 1.0 * F.normalize(torch.randn(rows, dim, generator=g, dtype=torch.float64), dim=1)  # cosine ~0.7
    w = F.normalize(torch.randn(slots, dim, generator=g, dtype=torch.float64), dim=1)
    hard = torch.randperm(slots, generator=g)[: slots // 20]
    source = torch.randint(0, rows, (hard.numel(),), generator=g)
    w[hard] = F.normalize(0.45 * q[source] + 0.9 * F.normalize(
        torch.randn(hard.numel(), dim, generator=g, dtype=torch.float64), dim=1), dim=1)
    y = torch.arange(rows)  # distinct identities in the batch
    yq = torch.randint(rows, 50 * slots, (slots,), generator=g)  # other identities in the queue
    return x.float(), k.float(), y, w.float(), yq


def loss_and_grad(x, k, y, w, yq, *, backend):
    x = x.clone().requires_grad_(True)
    loss = dcq_ops.dcq_cross_entropy(x, k, y, w, yq, **MARGIN, reduction="none", backend=backend)
    loss.sum().backward()
    return loss.detach().double(), x.grad.double()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=256, help="N, embeddings in the batch")
    parser.add_argument("--slots", type=int, default=100_000, help="K, queue slots")
    parser.add_argument("--dim", type=int, default=512, help="D, embedding size")
    parser.add_argument("--seed", type=int, default=0, help="seed of the inputs")
    parser.add_argument("--out", type=Path, default=OUT, help="JSON output (default: results/precision_cpu.json)")
    args = parser.parse_args(argv)

    x, k, y, w, yq = make_inputs(args.rows, args.slots, args.dim, args.seed)
    start = time.perf_counter()
    exact_loss, exact_grad = loss_and_grad(x.double(), k.double(), y, w.double(), yq, backend="reference")
    cos = F.normalize(x.double(), dim=1) @ w.double().t()
    print(f"reference in float64: {time.perf_counter() - start:.1f} s; negative cosines: max "
          f"{cos.max():.3f}, 99.9th percentile {cos.flatten().kthvalue(int(0.999 * cos.numel())).values:.3f}; "
          f"mean loss {exact_loss.mean():.4f}")
    results = []
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)):
        loss, grad = loss_and_grad(x, k, y, w.to(dtype), yq, backend="chunked")
        row_error = (loss - exact_loss).abs()
        grad_error = (grad - exact_grad).norm(dim=1) / exact_grad.norm(dim=1)
        results.append(dict(
            operands=name,
            mean_loss_error=abs(loss.mean() - exact_loss.mean()).item(),
            mean_loss_relative_error=(abs(loss.mean() - exact_loss.mean()) / exact_loss.mean()).item(),
            max_row_loss_error=row_error.max().item(),
            grad_relative_error_median=grad_error.median().item(),
            grad_relative_error_max=grad_error.max().item(),
        ))
    print(f"\ns = {MARGIN['scale']:g}, D = {args.dim}, K = {args.slots}, N = {args.rows}; errors against float64\n")
    print("| GEMM operands | mean loss: abs. error | mean loss: rel. error | worst row's loss: abs. error "
          "| gradient rel. error: median | gradient rel. error: max |")
    print("|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['operands']} | {r['mean_loss_error']:.2e} | {r['mean_loss_relative_error']:.2e} | "
              f"{r['max_row_loss_error']:.2e} | {r['grad_relative_error_median']:.2e} | "
              f"{r['grad_relative_error_max']:.2e} |")
    write_json(args.out, dict(
        settings=dict(vars(args), out=None, margin=MARGIN, backend="chunked (CPU emulation of 16-bit GEMM operands)"),
        host=dict(processor=cpu_model(), torch=torch.__version__, threads=torch.get_num_threads()),
        mean_exact_loss=exact_loss.mean().item(), results=results), meta("precision.py", argv))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
