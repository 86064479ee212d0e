#!/usr/bin/env python
"""Compile the Triton kernels of dcq_ops for an NVIDIA GPU without one.

    python scripts/triton_compile_check.py                       # sm_90, D=512, bf16/fp16/fp32, every config
    python scripts/triton_compile_check.py --dims 128,512 --dtypes bf16 --first-only

For each kernel configuration the autotuner may pick (dcq_ops.triton.margin_ce.
gpu_configs), compile the main kernel (gradient on and off) and the combine
kernel as a GPU run would (16-byte aligned arguments), then report the shared
memory, the registers and the spills that ptxas finds. Exit status 1 when a
kernel does not compile, needs more shared memory than the GPU has, or spills
more than --max-spill-bytes (default 64: a few spilled words cost nothing; the
accumulator spilling costs a lot). Useful where no GPU is at hand: what runs on one
compiles the same way.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

# The kernels must be decorated for the compiler, not Triton's CPU interpreter.
os.environ.pop("TRITON_INTERPRET", None)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.nvidia.compiler import get_ptxas  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from dcq_ops.triton import margin_ce  # noqa: E402

SHARED_LIMIT = {80: 163 << 10, 86: 99 << 10, 89: 99 << 10, 90: 227 << 10, 100: 227 << 10}


def compile_kernel(fn, signature, constants, aligned, arch, **options):
    names = list(signature) + list(constants)
    signature = dict(signature, **{name: "constexpr" for name in constants})
    attrs = {(names.index(name),): [["tt.divisibility", 16]] for name in aligned}
    return triton.compile(ASTSource(fn, signature, constexprs=constants, attrs=attrs),
                          target=GPUTarget("cuda", arch, 32), options=options)


def ptxas_report(compiled, arch):
    """(registers, spill bytes) from `ptxas -v` on the kernel's PTX."""
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(compiled.asm["ptx"])
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
    return registers, spills


def main_kernel(dtype, queue_dtype, block_d, block_m, config, compute_grad, arch):
    pointers = dict(q_ptr=f"*{dtype}", labels_ptr="*i64", w_ptr=f"*{queue_dtype}", queue_labels_ptr="*i64",
                    max_ws_ptr="*fp32", sum_ws_ptr="*fp32", acc_ws_ptr="*fp32")
    scalars = dict(num_rows="i32", queue_size="i32", dim="i32", num_splits="i32", split_size="i32",
                   scale_log2="fp32", filter_threshold="fp32", row_bucket="i32", split_bucket="i32")
    constants = dict(FILTER=True, COMPUTE_GRAD=compute_grad,
                     INPUT_PRECISION="ieee" if dtype == "fp32" else None,
                     BLOCK_M=block_m, BLOCK_K=config["BLOCK_K"], BLOCK_D=block_d)
    return compile_kernel(margin_ce._queue_pass_kernel, dict(pointers, **scalars), constants,
                          list(pointers) + ["num_rows", "queue_size", "dim", "split_size"], arch,
                          num_warps=config["num_warps"], num_stages=config["num_stages"])


def combine_kernel(block_r, block_s, block_d, arch):
    pointers = {name: "*fp32" for name in ("max_ws_ptr", "sum_ws_ptr", "acc_ws_ptr", "pos_logit_ptr",
                                           "pos_slope_ptr", "q_ptr", "w_ptr", "inv_norm_ptr", "loss_ptr",
                                           "grad_ptr")}
    scalars = dict(num_rows="i32", dim="i32", num_splits="i32", scale="fp32")
    constants = dict(COMPUTE_GRAD=True, BLOCK_R=block_r, BLOCK_S=block_s, BLOCK_D=block_d)
    return compile_kernel(margin_ce._combine_kernel, dict(pointers, **scalars), constants,
                          list(pointers) + ["dim"], arch, num_warps=4)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability x10 (default 90: H100/H200)")
    parser.add_argument("--dims", default="512", help="embedding sizes D, comma-separated")
    parser.add_argument("--dtypes", default="bf16,fp16,fp32", help="compute dtypes, comma-separated")
    parser.add_argument("--first-only", action="store_true", help="only the default (first) configuration")
    parser.add_argument("--max-spill-bytes", type=int, default=64)
    args = parser.parse_args(argv)

    limit = SHARED_LIMIT.get(args.arch, 99 << 10)
    failures = 0
    print(f"triton {triton.__version__}, sm_{args.arch}, shared memory limit {limit >> 10} KiB")
    for dim in (int(d) for d in args.dims.split(",")):
        block_d = max(16, 1 << (dim - 1).bit_length())
        for dtype in args.dtypes.split(","):
            element_size = 4 if dtype == "fp32" else 2
            block_m = margin_ce.block_rows(block_d, element_size)
            configs = margin_ce.gpu_configs(block_m, block_d, element_size)
            for config in configs[:1] if args.first_only else configs:
                for compute_grad in (True, False):
                    name = f"main D={dim} {dtype} BLOCK_M={block_m} {config} grad={compute_grad}"
                    try:
                        compiled = main_kernel(dtype, dtype, block_d, block_m, config, compute_grad, args.arch)
                        registers, spills = ptxas_report(compiled, args.arch)
                    except Exception as exc:  # noqa: BLE001 - report every failure
                        print(f"FAIL {name}: {exc.__class__.__name__}: {str(exc)[:500]}")
                        failures += 1
                        continue
                    shared = compiled.metadata.shared
                    bad = shared > limit or spills > args.max_spill_bytes
                    failures += bad
                    print(f"{'FAIL' if bad else 'ok  '} {name}: shared {shared >> 10} KiB, "
                          f"{registers} registers, {spills} bytes spilled")
        block_r, block_s = margin_ce.combine_blocks(4096, 8, block_d, programs=264)
        name = f"combine D={dim} BLOCK_R={block_r} BLOCK_S={block_s}"
        try:
            compiled = combine_kernel(block_r, block_s, block_d, args.arch)
            registers, spills = ptxas_report(compiled, args.arch)
            bad = spills > args.max_spill_bytes
            failures += bad
            print(f"{'FAIL' if bad else 'ok  '} {name}: {registers} registers, {spills} bytes spilled")
        except Exception as exc:  # noqa: BLE001
            print(f"FAIL {name}: {exc.__class__.__name__}: {str(exc)[:500]}")
            failures += 1
    print(f"{failures} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
