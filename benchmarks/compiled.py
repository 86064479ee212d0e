#!/usr/bin/env python
"""What the compiler makes of the Triton kernels, without a GPU: a stand-in for
GPU measurements until one is available.

    python benchmarks/compiled.py                    # sm_80 and sm_90, D=512, every dtype and config
    python benchmarks/compiled.py --targets 90 --dtypes bf16 --dim 512

For every target and every configuration that the dispatcher can choose there
(dcq_ops.triton.configs.tile_configs: the first is the default, the autotuner
tries them all), it compiles the queue-pass kernel (with and without the
gradient accumulator) and the merge kernel as a GPU run would, then reads:

- registers per thread and spill bytes (``ptxas -v`` on the PTX), and the
  shared memory (Triton's metadata), against the target's limit;
- in the queue-pass loop (the PTX loop that holds the MMAs): the MMA
  instructions per iteration and their FLOPs divided by the ideal, two GEMMs
  of BLOCK_M x BLOCK_K x D done once each (one without the gradient; > 1:
  warps repeat each other's work); the exponentials (ex2) per logit (ideal: 1).

Writes benchmarks/results/compiled.json (one entry per kernel and
configuration) and prints a table. Exit status 1 when a kernel does not
compile, spills, or needs more shared memory than the target has: CI runs it.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

# The kernels must be decorated for the compiler, not for Triton's CPU interpreter.
os.environ.pop("TRITON_INTERPRET", None)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.nvidia.compiler import get_ptxas  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import cpu_model, meta, write_json  # noqa: E402

from dcq_ops.triton import kernels, launch  # noqa: E402
from dcq_ops.triton.configs import ARCHITECTURES, block_d_of, mma_family, tile_configs  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "compiled.json"
DTYPES = {"bf16": ("bf16", 2, None), "fp16": ("fp16", 2, None), "fp32": ("fp32", 4, "ieee"),
          "tf32": ("fp32", 4, "tf32")}
TARGETS = {80: "sm_80", 86: "sm_86", 89: "sm_89", 90: "sm_90", 100: "sm_100"}

# FLOPs of one MMA instruction: (regex on the PTX, FLOPs per issue, issued by "warp" or "warpgroup").
_PRED = r"^\s*(?:@!?%p\d+\s+)?"  # an optional predicate
_MMA_SYNC = re.compile(_PRED + r"mma\.sync\.aligned\.m(\d+)n(\d+)k(\d+)", re.M)
_WGMMA = re.compile(_PRED + r"wgmma\.mma_async\.sync\.aligned\.m(\d+)n(\d+)k(\d+)", re.M)
_TCGEN05 = re.compile(_PRED + r"tcgen05\.mma\b", re.M)  # shapes live in a runtime descriptor: counted, not sized
_EX2 = re.compile(_PRED + r"ex2\.approx\.(?:ftz\.)?(f32|f16x2|bf16x2|f16|bf16)\b", re.M)
_LABEL = re.compile(r"^(\$L__\w+):", re.M)
_BRANCH = re.compile(r"^\s*(?:@!?%p\d+\s+)?bra(?:\.uni)?\s+(\$L__\w+);", re.M)


def compile_kernel(fn, signature, constants, aligned, arch, **options):
    names = list(signature) + list(constants)
    signature = dict(signature, **{name: "constexpr" for name in constants})
    attrs = {(names.index(name),): [["tt.divisibility", 16]] for name in aligned}
    return triton.compile(ASTSource(fn, signature, constexprs=constants, attrs=attrs),
                          target=GPUTarget("cuda", arch, 32), options=options)


def ptxas_report(ptx: str, arch: int) -> tuple[int, int]:
    """(registers per thread, spill bytes) from ``ptxas -v``."""
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    try:
        gpu = f"sm_{arch}a" if arch in (90, 100) else f"sm_{arch}"
        run = subprocess.run([get_ptxas(arch).path, "-v", f"--gpu-name={gpu}", f.name, "-o", os.devnull],
                             capture_output=True, text=True)
    finally:
        os.unlink(f.name)
    text = run.stdout + run.stderr
    if run.returncode != 0:
        raise RuntimeError(f"ptxas failed: {text[-2000:]}")
    registers = max(int(n) for n in re.findall(r"Used (\d+) registers", text))
    spills = max(int(n) for n in re.findall(r"(\d+) bytes spill stores", text))
    spills = max([spills] + [int(n) for n in re.findall(r"(\d+) bytes spill loads", text)])
    return registers, spills


def main_loop(ptx: str) -> str:
    """The body of the PTX loop with the most MMA instructions (a backward branch
    to a label: the loop over queue tiles, software-pipelined by Triton)."""
    labels = {m.group(1): m.start() for m in _LABEL.finditer(ptx)}
    best, best_count = "", -1
    for branch in _BRANCH.finditer(ptx):
        start = labels.get(branch.group(1))
        if start is None or start >= branch.start():
            continue  # a forward branch
        body = ptx[start:branch.end()]
        count = sum(len(r.findall(body)) for r in (_MMA_SYNC, _WGMMA, _TCGEN05, _EX2))
        if count > best_count:
            best, best_count = body, count
    return best


def loop_counts(ptx: str, config, block_d: int, gemms: int) -> dict:
    """MMA FLOPs and exponentials per loop iteration, relative to the ideal
    (``gemms`` GEMMs of BLOCK_M x BLOCK_K x D, each done once; one exponential per logit)."""
    body = main_loop(ptx)
    warps = config.num_warps
    flops, instructions, kinds = 0, 0, set()
    for m, n, k in _MMA_SYNC.findall(body):  # one per warp
        flops += 2 * int(m) * int(n) * int(k) * warps
        instructions += 1
        kinds.add(f"mma.sync m{m}n{n}k{k}")
    for m, n, k in _WGMMA.findall(body):  # one per warpgroup (4 warps)
        flops += 2 * int(m) * int(n) * int(k) * max(1, warps // 4)
        instructions += 1
        kinds.add(f"wgmma m{m}n{n}k{k}")
    tcgen05 = len(_TCGEN05.findall(body))
    if tcgen05:
        instructions += tcgen05
        kinds.add("tcgen05.mma")
    exps = 0
    for kind in _EX2.findall(body):  # per thread; packed forms hold two
        exps += (2 if kind.endswith("x2") else 1) * 32 * warps
    ideal = gemms * (2 * config.block_m * config.block_k * block_d)
    logits = config.block_m * config.block_k
    return dict(mma_instructions_per_iteration=instructions, mma_kinds=sorted(kinds),
                mma_flops_over_ideal=round(flops / ideal, 3) if flops and not tcgen05 else None,
                exponentials_per_logit=round(exps / logits, 3) if body else None)


def queue_pass(dtype: str, precision, block_d: int, config, compute_grad: bool, arch: int):
    pointers = dict(q_ptr=f"*{dtype}", labels_ptr="*i64", w_ptr=f"*{dtype}", queue_labels_ptr="*i64",
                    max_ws_ptr="*fp32", sum_ws_ptr="*fp32", acc_ws_ptr="*fp32")
    scalars = dict(num_rows="i32", queue_size="i32", dim="i32", num_splits="i32", split_size="i32",
                   scale_log2="fp32", interclass_filtering_threshold="fp32", row_bucket="i32", split_bucket="i32")
    constants = dict(FILTER=True, COMPUTE_GRAD=compute_grad, INPUT_PRECISION=precision,
                     BLOCK_M=config.block_m, BLOCK_K=config.block_k, BLOCK_D=block_d)
    return compile_kernel(kernels.queue_pass_kernel, dict(pointers, **scalars), constants,
                          list(pointers) + ["num_rows", "queue_size", "dim", "split_size"], arch,
                          num_warps=config.num_warps, num_stages=config.num_stages)


def merge_kernel(block_d: int, finalize: bool, arch: int):
    block_r, block_s = launch.merge_blocks(4096, 8, block_d, programs=264)
    pointers = {name: "*fp32" for name in ("max_ws_ptr", "sum_ws_ptr", "acc_ws_ptr", "out_max_ptr", "out_sum_ptr",
                                           "out_acc_ptr", "pos_logit_ptr", "pos_slope_ptr", "q_ptr", "w_ptr",
                                           "inv_norm_ptr", "loss_ptr", "grad_ptr")}
    scalars = dict(num_rows="i32", dim="i32", num_splits="i32", scale="fp32")
    constants = dict(FINALIZE=finalize, COMPUTE_GRAD=True, BLOCK_R=block_r, BLOCK_S=block_s, BLOCK_D=block_d)
    compiled = compile_kernel(kernels.merge_kernel, dict(pointers, **scalars), constants,
                              list(pointers) + ["dim"], arch, num_warps=4)
    return compiled, dict(BLOCK_R=block_r, BLOCK_S=block_s, num_warps=4)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--targets", default="80,86,90,100", help="compute capabilities x10, comma-separated")
    parser.add_argument("--dtypes", default="bf16,fp16,fp32,tf32", help=f"subset of {','.join(DTYPES)}")
    parser.add_argument("--dim", type=int, default=512, help="embedding size D (the kernel benchmark's: 512)")
    parser.add_argument("--first-only", action="store_true", help="only the default configuration of each")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    run_meta = meta("compiled.py", sys.argv[1:] if argv is None else argv, note="compiled without a GPU")

    block_d = block_d_of(args.dim)
    entries, failures = [], 0
    print(f"triton {triton.__version__}, D={args.dim}")
    for arch in (int(t) for t in args.targets.split(",")):
        target = ARCHITECTURES[TARGETS[arch]]
        limit = target.shared_memory_per_block_optin
        for name in args.dtypes.split(","):
            dtype, element_size, precision = DTYPES[name]
            configs = tile_configs(target, element_size, args.dim, tf32=precision == "tf32")
            for rank, config in enumerate(configs[:1] if args.first_only else configs):
                for compute_grad in (True, False):
                    entry = dict(target=target.name, kernel="queue_pass", gradient=compute_grad, dtype=name,
                                 default=rank == 0, BLOCK_D=block_d, **config.as_dict(),
                                 shared_estimate=config.shared_bytes(block_d, element_size,
                                                                     mma_family(target.capability)))
                    try:
                        compiled = queue_pass(dtype, precision, block_d, config, compute_grad, arch)
                        registers, spills = ptxas_report(compiled.asm["ptx"], arch)
                        entry.update(registers=registers, spill_bytes=spills, shared=compiled.metadata.shared,
                                     **loop_counts(compiled.asm["ptx"], config, block_d, 2 if compute_grad else 1))
                    except Exception as exc:  # noqa: BLE001 - every failure is reported
                        entry.update(error=f"{type(exc).__name__}: {str(exc)[:300]}")
                    entries.append(entry)
        for finalize in (False, True):
            entry = dict(target=target.name, kernel="merge_finalize" if finalize else "merge", dtype="fp32",
                         BLOCK_D=block_d)
            try:
                compiled, launch = merge_kernel(block_d, finalize, arch)
                registers, spills = ptxas_report(compiled.asm["ptx"], arch)
                entry.update(launch, registers=registers, spill_bytes=spills, shared=compiled.metadata.shared)
            except Exception as exc:  # noqa: BLE001
                entry.update(error=f"{type(exc).__name__}: {str(exc)[:300]}")
            entries.append(entry)

    for e in entries:
        limit = ARCHITECTURES[e["target"]].shared_memory_per_block_optin
        bad = "error" in e or e["spill_bytes"] > 0 or e["shared"] > limit
        e["ok"] = not bad
        failures += bad
        if "error" in e:
            print(f"FAIL {e['target']} {e['kernel']} {e['dtype']}: {e['error']}")
            continue
        tiles = (f"M{e['BLOCK_M']} K{e['BLOCK_K']} w{e['num_warps']} s{e['num_stages']}"
                 if e["kernel"] == "queue_pass" else f"R{e['BLOCK_R']} S{e['BLOCK_S']}")
        loop = ""
        if e["kernel"] == "queue_pass":
            loop = (f" | MMA/iter {e['mma_instructions_per_iteration']} flops/ideal {e['mma_flops_over_ideal']} "
                    f"exp/logit {e['exponentials_per_logit']}")
        print(f"{'ok  ' if e['ok'] else 'FAIL'} {e['target']} {e['kernel']:<14} {e['dtype']:<4} "
              f"{'grad' if e.get('gradient', True) else 'loss'} {tiles:<18} regs {e['registers']:>3} "
              f"spill {e['spill_bytes']:>4} B shared {e['shared'] >> 10:>3}/{limit >> 10} KiB{loop}")
    write_json(args.out, dict(
        triton=triton.__version__, dim=args.dim, host=cpu_model(),
        note="compiled without a GPU; FLOPs/ideal > 1 means warps repeat each other's MMAs",
        entries=entries), run_meta)
    print(f"{failures} failure(s); wrote {args.out}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
