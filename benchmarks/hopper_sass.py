#!/usr/bin/env python
"""The SASS of the pipelined sm_90 queue pass (dcq_ops/triton/hopper.py), compiled
without a GPU under the running Triton:

    python benchmarks/hopper_sass.py                       # bf16 and fp16, with and without the gradient
    /tmp/t36h/bin/python benchmarks/hopper_sass.py --json out36.json   # another Triton

Two kernels: dcq_ops/triton/hopper_seesaw_kernel.py (the seesaw: two warp-specialized
consumer warpgroups taking the tiles in turn; first in the ranked sm_90 chain,
dcq_ops.triton.hopper_launch.CHAIN) and dcq_ops/triton/hopper.py (the pipelined
kernel, its fallback, with its two schedules). benchmarks/compiled.py reports both
(``variants_for``, its EXTRA_KERNELS: the seesaw's counts from consumer 0's loop,
``seesaw_counts``, and each consumer loop). For each
variant it compiles the Gluon kernel for sm_90a (D=512, 64 x 64 tiles,
8 warps, STAGES buffers), reads Triton's own ptxas log (registers, spills, every
warning and performance advisory, e.g. C7510/C7515/C7516 for serialized wgmma) and
disassembles the cubin with Triton's own nvdisasm. In the SASS loop that holds
the most HGMMA (the loop over queue tiles; for the seesaw each consumer's own
loop, the first one the default partition's) it counts, per iteration and per
thread: HGMMA (and their FLOPs over the ideal two GEMMs of 64 x 64 x D),
WARPGROUP.DEPBAR (the wgmma waits), UTMALDG (TMA loads), LDGSTS (cp.async),
MUFU.EX2 (exponentials per logit), BAR.SYNC, FMUL and all instructions; and
which exponentials and TMA loads are issued while a wgmma group is still in
flight (after a wait that leaves one outstanding, before the next full wait).
Compile-only: no statement here is a GPU timing.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.nvidia.compiler import get_ptxas  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from dcq_ops.triton import hopper, hopper_launch, hopper_seesaw  # noqa: E402
from dcq_ops.triton.configs import block_d_of  # noqa: E402
from triton.experimental.gluon import language as gl  # noqa: E402
from triton.experimental.gluon._runtime import GluonASTSource  # noqa: E402

DTYPES = {"bf16": gl.bfloat16, "fp16": gl.float16}
# OVERLAP_SOFTMAX: False, the load of tile i+2 issued a tile ahead and the softmax
# after both GEMMs; True, FA3's order (the softmax of tile i+1 under P_i W_i).
SCHEDULES = {False: "load-ahead", True: "softmax-overlap"}
_HGMMA = re.compile(r"\bHGMMA\.(\d+)x(\d+)x(\d+)")
_LABEL = re.compile(r"^(\.L_x_\d+):", re.M)
_BRANCH = re.compile(r"\bBRA\b[^`]*`\((\.L_x_\d+)\)")
_COUNTED = ("HGMMA", "WARPGROUP.DEPBAR", "WARPGROUP.ARRIVE", "UTMALDG", "LDGSTS", "MUFU.EX2", "BAR.SYNC",
            "FMUL", "SYNCS")


def descriptor_types(dtype: str, dim: int, w_block: list | None = None) -> tuple[str, str]:
    """The kernel's signature types of q_desc and w_desc (what the launcher's host
    descriptors, hopper_launch.gluon_descriptors, mangle to; the queue's in blocks of
    ``w_block`` where given, with the layout of the full block, as
    hopper_seesaw.queue_descriptor makes it)."""
    block_d = block_d_of(dim)
    out = []
    for rows, cols in ((hopper.BLOCK_M, block_d), tuple(w_block or (hopper.BLOCK_K, block_d))):
        layout = gl.NVMMASharedLayout.get_default_for([rows, block_d], DTYPES[dtype])
        out.append(f"tensordesc<{dtype}[{rows},{cols}],{layout!r}>")
    return tuple(out)


def _compile(kernel, dtype: str, dim: int, constants: dict, options: dict, w_block: list | None = None):
    """A queue-pass Gluon kernel on the launcher's descriptors, compiled for sm_90 (the
    queue's in blocks of ``w_block`` where given: the seesaw's half-width loads)."""
    q_type, w_type = descriptor_types(dtype, dim, w_block)
    signature = dict(
        q_desc=q_type,
        w_desc=w_type,
        labels_ptr="*i64", queue_labels_ptr="*i64", max_ws_ptr="*fp32", sum_ws_ptr="*fp32", acc_ws_ptr="*fp32",
        num_rows="i32", queue_size="i32", dim="i32", num_splits="i32", split_size="i32", scale_log2="fp32",
        interclass_filtering_threshold="fp32")
    names = list(signature) + list(constants)
    signature.update({name: "constexpr" for name in constants})
    aligned = ["labels_ptr", "queue_labels_ptr", "max_ws_ptr", "sum_ws_ptr", "acc_ws_ptr", "dim", "split_size"]
    attrs = {(names.index(name),): [["tt.divisibility", 16]] for name in aligned}
    source = GluonASTSource(kernel, signature, constexprs=constants, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)


def compile_hopper(dtype: str, dim: int, compute_grad: bool, stages: int = hopper.STAGES,
                   rescale_on_growth: bool = hopper_launch.RESCALE_ON_GROWTH,
                   overlap_softmax: bool = hopper_launch.OVERLAP_SOFTMAX):
    """The Gluon kernel compiled for sm_90 (as a launch with these operands would)."""
    constants = dict(FILTER=True, COMPUTE_GRAD=compute_grad, STAGES=stages, RESCALE_ON_GROWTH=rescale_on_growth,
                     OVERLAP_SOFTMAX=overlap_softmax)
    return _compile(hopper.hopper_queue_pass_kernel, dtype, dim, constants, dict(num_warps=hopper.NUM_WARPS))


def seesaw_stages(dim: int) -> int:
    """The seesaw's ring depth that a launch at D = ``dim`` (16-bit) uses."""
    return hopper_seesaw.stages(block_d_of(dim))


def compile_seesaw(dtype: str, dim: int, compute_grad: bool,
                   rescale_on_growth: bool = hopper_launch.SEESAW_RESCALE_ON_GROWTH, stages: int | None = None):
    """The seesaw kernel compiled for sm_90, on the same descriptors, with the launch's
    ring depth at this D (or ``stages``)."""
    stages = seesaw_stages(dim) if stages is None else stages
    constants = dict(FILTER=True, COMPUTE_GRAD=compute_grad, RESCALE_ON_GROWTH=rescale_on_growth, STAGES=stages)
    return _compile(hopper_seesaw.seesaw_queue_pass_kernel, dtype, dim, constants,
                    dict(num_warps=hopper_seesaw.NUM_WARPS, maxnreg=hopper_seesaw.MAXNREG),
                    seesaw_load_block(dim, stages))


def seesaw_load_block(dim: int, stages: int | None = None) -> list:
    """The block of the seesaw's queue descriptor at D = ``dim`` (hopper_seesaw.load_block:
    half of D with a ring of 2 buffers)."""
    block_d = block_d_of(dim)
    stages = seesaw_stages(dim) if stages is None else stages
    return [hopper_seesaw.BLOCK_K, block_d // hopper_seesaw.halves(stages)]


def ptxas_report(compiled) -> dict:
    """Registers, spill bytes and ptxas's warnings and performance advisories (the
    C7510/C7515/C7516 of serialized wgmma print as "info"): benchmarks/triton_compile's
    reading, Triton's own ptxas command with its log."""
    from triton_compile import ptxas_log

    return ptxas_log(compiled, 90)


def sass_of(cubin: bytes) -> str:
    nvdisasm = Path(get_ptxas(90).path).with_name("nvdisasm")
    with tempfile.NamedTemporaryFile("wb", suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        return subprocess.run([str(nvdisasm), f.name], capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(f.name)


def main_loop(sass: str) -> str:
    """The body of the SASS loop (a backward branch) holding the most HGMMA."""
    labels = {m.group(1): m.start() for m in _LABEL.finditer(sass)}
    # ptxas places the retry loops of mbarrier waits after the kernel's last
    # EXIT, each branching back into the middle of the code: not loops over tiles.
    exits = [m.start() for m in re.finditer(r"^\s*/\*[0-9a-f]+\*/\s+EXIT\s*;", sass, re.M)]
    end = exits[-1] if exits else len(sass)
    best, best_count = "", -1
    for branch in _BRANCH.finditer(sass):
        start = labels.get(branch.group(1))
        if start is None or start >= branch.start() or branch.start() > end:
            continue
        body = sass[start:branch.end()]
        count = body.count("HGMMA")
        if count > best_count:
            best, best_count = body, count
    return best


def _instructions(body: str) -> list[str]:
    """The instructions of a SASS listing (the text between /*addr*/ and ';')."""
    return [m.group(1).strip() for m in re.finditer(r"/\*[0-9a-f]{4,}\*/\s+([^;]*);", body)]


def consumer_loops(sass: str) -> list[str]:
    """The bodies of the innermost SASS loops that hold HGMMA, in code order: for
    the seesaw kernel each consumer warpgroup's loop over its tiles (the default
    partition's first), not the dispatch loop of the partitions around them."""
    from sass_counts import loops

    found = loops(sass)
    inner = [lp for lp in found if not any(o is not lp and lp.start <= o.start and o.end <= lp.end for o in found)]
    return [lp.body for lp in sorted(inner, key=lambda lp: lp.start) if "HGMMA" in lp.body]


def loop_counts(sass: str, block_m: int, block_k: int, block_d: int, gemms: int, body: str | None = None,
                warpgroups: int = 2) -> dict:
    """Per iteration and thread of the loop ``body`` (default: the loop with the most
    HGMMA), which ``warpgroups`` warpgroups run together on one tile an iteration."""
    body = main_loop(sass) if body is None else body
    instructions = _instructions(body)
    counts = {name: sum(1 for ins in instructions if re.search(r"(^|\s|\})" + re.escape(name) + r"\b", ins))
              for name in _COUNTED}
    counts["local"] = sum(1 for ins in instructions if re.match(r"(@!?P\d+\s+)?(LDL|STL)\b", ins))
    flops = sum(2 * int(m) * int(n) * int(k) * warpgroups  # each warpgroup issues the loop's stream
                for m, n, k in _HGMMA.findall(body))
    ideal = gemms * 2 * block_m * block_k * block_d
    # What is issued while a wgmma group is still in flight: between a wait that
    # leaves one group outstanding (DEPBAR.LE gsb0, 0x1) and the next full wait.
    in_flight, under = False, {"MUFU.EX2": 0, "UTMALDG": 0}
    for ins in instructions:
        if "WARPGROUP.DEPBAR" in ins:
            in_flight = ins.rstrip().endswith("0x1")
        for name in under:
            under[name] += in_flight and name in ins
    return dict(
        loop_instructions=len(instructions), per_iteration={k.lower(): v for k, v in counts.items()},
        hgmma_shapes=sorted(set("x".join(s) for s in _HGMMA.findall(body))),
        mma_flops_over_ideal=round(flops / ideal, 3) if ideal else None,
        exponentials_per_logit=round(counts["MUFU.EX2"] * 128 * warpgroups / (block_m * block_k), 3),
        depbar_at_most_quarter_of_hgmma=counts["WARPGROUP.DEPBAR"] * 4 <= counts["HGMMA"],
        ex2_under_mma=under["MUFU.EX2"], utmaldg_under_mma=under["UTMALDG"],
    )


def report(dtype: str, dim: int, compute_grad: bool, stages: int = hopper.STAGES,
           rescale_on_growth: bool = hopper_launch.RESCALE_ON_GROWTH,
           overlap_softmax: bool = hopper_launch.OVERLAP_SOFTMAX) -> dict:
    block_d = block_d_of(dim)
    entry = dict(kernel="hopper_queue_pass", target="sm_90", dtype=dtype, gradient=compute_grad, BLOCK_M=hopper.BLOCK_M,
                 BLOCK_K=hopper.BLOCK_K, BLOCK_D=block_d, num_warps=hopper.NUM_WARPS, stages=stages,
                 schedule=SCHEDULES[overlap_softmax], rescale_on_growth=rescale_on_growth,
                 default=(rescale_on_growth, overlap_softmax) == (hopper_launch.RESCALE_ON_GROWTH,
                                                                  hopper_launch.OVERLAP_SOFTMAX))
    compiled = compile_hopper(dtype, dim, compute_grad, stages, rescale_on_growth, overlap_softmax)
    entry.update(ptxas_report(compiled), shared=compiled.metadata.shared)
    entry.update(loop_counts(sass_of(compiled.asm["cubin"]), hopper.BLOCK_M, hopper.BLOCK_K, block_d,
                             2 if compute_grad else 1))
    if compute_grad:  # benchmarks/cycle_model.py's per-tile estimate (H100 rates), as compiled.py applies it
        from cycle_model import cycle_model
        from sass_counts import disassemble
        model = cycle_model(disassemble(compiled.asm["cubin"]), hopper.BLOCK_M, hopper.BLOCK_K, dim,
                            hopper.NUM_WARPS, num_stages=stages, gemms=2)
        entry["cycle_model"] = {k: model[k] for k in ("clocks_per_tile", "clocks_serialized", "clocks_pipelined",
                                                      "serialized", "fraction_of_peak", "components")}
    return entry


def report_seesaw(dtype: str, dim: int, compute_grad: bool,
                  rescale_on_growth: bool = hopper_launch.SEESAW_RESCALE_ON_GROWTH, stages: int | None = None) -> dict:
    """The seesaw kernel's entry: its counts per iteration of consumer 0's loop (one
    tile: its S GEMM and softmax, and its half of two tiles' P W), each consumer
    loop's HGMMA, waits and local-memory accesses, and the cycle model with the two
    consumers taking the tiles in turn."""
    block_d = block_d_of(dim)
    entry = dict(kernel="hopper_seesaw_queue_pass", target="sm_90", dtype=dtype, gradient=compute_grad,
                 BLOCK_M=hopper.BLOCK_M, BLOCK_K=hopper.BLOCK_K, BLOCK_D=block_d,
                 num_warps=2 * hopper_seesaw.NUM_WARPS, stages=stages, schedule="seesaw",
                 rescale_on_growth=rescale_on_growth, default=False)
    stages = entry["stages"] = seesaw_stages(dim) if stages is None else stages
    compiled = compile_seesaw(dtype, dim, compute_grad, rescale_on_growth, stages)
    entry.update(ptxas_report(compiled), shared=compiled.metadata.shared)
    sass = sass_of(compiled.asm["cubin"])
    bodies = consumer_loops(sass)
    gemms = 2 if compute_grad else 1
    entry.update(loop_counts(sass, hopper.BLOCK_M, hopper.BLOCK_K, block_d, gemms, body=bodies[0], warpgroups=1))
    entry["consumer_loops"] = []
    for body in bodies:
        c = loop_counts(sass, hopper.BLOCK_M, hopper.BLOCK_K, block_d, gemms, body=body, warpgroups=1)
        kept = ("hgmma", "warpgroup.depbar", "utmaldg", "mufu.ex2", "bar.sync", "local")
        entry["consumer_loops"].append(dict(instructions=c["loop_instructions"],
                                            **{k: c["per_iteration"][k] for k in kept}))
    if compute_grad:
        from cycle_model import cycle_model
        from sass_counts import disassemble
        model = cycle_model(disassemble(compiled.asm["cubin"]), hopper.BLOCK_M, hopper.BLOCK_K, dim,
                            hopper_seesaw.NUM_WARPS, mma_warpgroups=1, num_stages=stages, gemms=2,
                            interleave=2)
        entry["cycle_model"] = {k: model[k] for k in ("clocks_per_tile", "clocks_serialized", "clocks_pipelined",
                                                      "serialized", "fraction_of_peak", "components",
                                                      "load_structure")}
    return entry


def seesaw_counts(compiled, dim: int, compute_grad: bool) -> dict:
    """The seesaw's work per iteration of consumer 0's loop (one tile, one warpgroup's
    MMAs), as report_seesaw reads it, in the fields of a benchmarks/compiled.py entry:
    its MMA instructions, their FLOPs over the ideal, exponentials per logit, HGMMA shapes.

    Raises
    ------
    ValueError
        The SASS has no innermost loop with HGMMA (no consumer loop).
    """
    block_d = block_d_of(dim)
    sass = sass_of(compiled.asm["cubin"])
    bodies = consumer_loops(sass)
    if not bodies:
        raise ValueError("no consumer loop (an innermost loop with HGMMA) in the seesaw's SASS")
    c = loop_counts(sass, hopper_seesaw.BLOCK_M, hopper_seesaw.BLOCK_K, block_d, 2 if compute_grad else 1,
                    body=bodies[0], warpgroups=1)
    return dict(mma_instructions_per_iteration=c["per_iteration"]["hgmma"],
                mma_kinds=[f"wgmma m{m}n{n}k{k}" for m, n, k in (s.split("x") for s in c["hgmma_shapes"])],
                mma_flops_over_ideal=c["mma_flops_over_ideal"], exponentials_per_logit=c["exponentials_per_logit"])


def _chain_rank(kernel: str) -> int | None:
    """Where ``kernel`` stands in the ranked sm_90 chain (hopper_launch.CHAIN; 0: tried first)."""
    return hopper_launch.CHAIN.index(kernel) if kernel in hopper_launch.CHAIN else None


def variants_for(variant_class):
    """The Gluon kernels' entries of benchmarks/compiled.py (its EXTRA_KERNELS): a
    function (arch, dtypes, dim, first_only) -> [variant_class(...)], on sm_90 and 16-bit
    dtypes only.

    - The pipelined kernel: the launch's schedule with and without the gradient,
      and (not ``first_only``) with the gradient the other schedule.
    - The seesaw: with the gradient and without, the launch's rescale rule and ring
      depth at this D (``seesaw_stages``). Its counts and cycle model read consumer
      0's own loop (``consumer_loops``: one tile an iteration, one warpgroup's MMAs;
      the cycle model with the two consumers taking the tiles in turn).

    Each entry's ``chain_rank`` is the kernel's place in hopper_launch.CHAIN, and
    ``default`` says that an sm_90 launch runs it (DCQ_OPS_SM90_KERNEL unset): the
    chain's first kernel, in the launch's variant. Each carries the cycle model's tile
    (the model reads from the SASS how far ahead of its wait each load is issued) and
    the ideal work it must not exceed."""
    from ptx_counts import loop_counts as ptx_loop_counts  # benchmarks/ptx_counts.py

    def variants(arch: int, dtypes: list[str], dim: int, first_only: bool) -> list:
        if arch != 90 or not hopper.AVAILABLE:
            return []
        block_d = block_d_of(dim)
        tile = type("Tile", (), dict(block_m=hopper.BLOCK_M, block_k=hopper.BLOCK_K, num_warps=hopper.NUM_WARPS))
        out = []
        for dtype in (d for d in dtypes if d in DTYPES):
            out += _seesaw_variants(variant_class, dtype, dim, block_d)
            for compute_grad, overlap in ((True, hopper_launch.OVERLAP_SOFTMAX), (False, hopper_launch.OVERLAP_SOFTMAX),
                                          (True, not hopper_launch.OVERLAP_SOFTMAX)):
                if first_only and overlap != hopper_launch.OVERLAP_SOFTMAX:
                    continue
                entry = dict(target="sm_90", kernel="hopper_queue_pass_" + SCHEDULES[overlap].replace("-", "_"),
                             gradient=compute_grad, filter=True, dtype=dtype, chain_rank=_chain_rank("pipelined"),
                             default=overlap == hopper_launch.OVERLAP_SOFTMAX and _chain_rank("pipelined") == 0,
                             BLOCK_D=block_d,
                             BLOCK_M=hopper.BLOCK_M, BLOCK_K=hopper.BLOCK_K, num_warps=hopper.NUM_WARPS,
                             num_stages=hopper.STAGES, rescale_on_growth=hopper_launch.RESCALE_ON_GROWTH)

                def build(dtype=dtype, compute_grad=compute_grad, overlap=overlap):
                    compiled = compile_hopper(dtype, dim, compute_grad, overlap_softmax=overlap)
                    counts = ptx_loop_counts(compiled.asm["ptx"], tile, block_d, 2 if compute_grad else 1)
                    return compiled, dict(**counts, chain_break="none (Gluon: the layouts are explicit)")
                model = (dict(tile_m=hopper.BLOCK_M, tile_n=hopper.BLOCK_K, dim=dim, warps=hopper.NUM_WARPS,
                              num_stages=hopper.STAGES, gemms=2) if compute_grad else None)
                out.append(variant_class(entry, build, model, (1.0, 1.125)))
        return out

    return variants


def _seesaw_variants(variant_class, dtype: str, dim: int, block_d: int) -> list:
    """The seesaw's two entries of ``variants_for`` at one dtype: with the gradient and without."""
    stages = seesaw_stages(dim)
    out = []
    for compute_grad in (True, False):
        entry = dict(target="sm_90", kernel="hopper_seesaw_queue_pass", gradient=compute_grad, filter=True,
                     dtype=dtype, chain_rank=_chain_rank("seesaw"), default=_chain_rank("seesaw") == 0,
                     BLOCK_D=block_d, BLOCK_M=hopper_seesaw.BLOCK_M, BLOCK_K=hopper_seesaw.BLOCK_K,
                     num_warps=2 * hopper_seesaw.NUM_WARPS, num_stages=stages, schedule="seesaw",
                     rescale_on_growth=hopper_launch.SEESAW_RESCALE_ON_GROWTH)

        def build(dtype=dtype, compute_grad=compute_grad):
            compiled = compile_seesaw(dtype, dim, compute_grad, hopper_launch.SEESAW_RESCALE_ON_GROWTH)
            return compiled, dict(**seesaw_counts(compiled, dim, compute_grad),
                                  chain_break="none (Gluon: the layouts are explicit)")
        # One consumer's loop: its own warpgroup's MMAs and warps; the other takes the next tile.
        model = (dict(tile_m=hopper_seesaw.BLOCK_M, tile_n=hopper_seesaw.BLOCK_K, dim=dim,
                      warps=hopper_seesaw.NUM_WARPS, mma_warpgroups=1, num_stages=stages, gemms=2, interleave=2)
                 if compute_grad else None)
        out.append(variant_class(entry, build, model, (1.0, 1.125), consumer_loops=consumer_loops))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtypes", default="bf16,fp16")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--json", type=Path, help="write the entries there")
    parser.add_argument("--defaults-only", action="store_true",
                        help="only the launch's variant (with and without the gradient)")
    args = parser.parse_args(argv)
    entries = []
    # The launch's choice with and without the gradient; with the gradient also the
    # other schedule and the other rescale rule, for the comparison.
    variants = [(True, hopper_launch.RESCALE_ON_GROWTH, hopper_launch.OVERLAP_SOFTMAX),
                (False, hopper_launch.RESCALE_ON_GROWTH, hopper_launch.OVERLAP_SOFTMAX)]
    if not args.defaults_only:
        variants += [(True, hopper_launch.RESCALE_ON_GROWTH, not hopper_launch.OVERLAP_SOFTMAX),
                     (True, not hopper_launch.RESCALE_ON_GROWTH, hopper_launch.OVERLAP_SOFTMAX)]
    for dtype in args.dtypes.split(","):
        for compute_grad, rescale_on_growth, overlap_softmax in variants:
            try:
                entries.append(report(dtype, args.dim, compute_grad, rescale_on_growth=rescale_on_growth,
                                      overlap_softmax=overlap_softmax))
            except Exception as exc:  # noqa: BLE001 - every failure is reported
                entries.append(dict(kernel="hopper_queue_pass", dtype=dtype, gradient=compute_grad,
                                    schedule=SCHEDULES[overlap_softmax], rescale_on_growth=rescale_on_growth,
                                    error=f"{type(exc).__name__}: {str(exc)[:600]}"))
        # The seesaw (not launched): with the gradient under both rescale rules, and without.
        seesaw = [(True, hopper_launch.SEESAW_RESCALE_ON_GROWTH), (False, hopper_launch.SEESAW_RESCALE_ON_GROWTH)]
        if not args.defaults_only:
            seesaw.append((True, not hopper_launch.SEESAW_RESCALE_ON_GROWTH))
        for compute_grad, rescale_on_growth in seesaw:
            try:
                entries.append(report_seesaw(dtype, args.dim, compute_grad, rescale_on_growth))
            except Exception as exc:  # noqa: BLE001 - every failure is reported
                entries.append(dict(kernel="hopper_seesaw_queue_pass", dtype=dtype, gradient=compute_grad,
                                    schedule="seesaw", rescale_on_growth=rescale_on_growth,
                                    error=f"{type(exc).__name__}: {str(exc)[:600]}"))
    print(f"triton {triton.__version__}, sm_90, D={args.dim}")
    failures = 0
    for e in entries:
        name = (f"{e['kernel']} {e['dtype']} {'grad' if e['gradient'] else 'loss'} {e['schedule']} "
                f"{'rescale-on-growth' if e['rescale_on_growth'] else 'rescale-always'}")
        if "error" in e:
            failures += 1
            print(f"FAIL {name}: {e['error']}")
            continue
        c = e["per_iteration"]
        print(f"{name}: regs {e['registers']} spill {e['spill_bytes']} B "
              f"shared {e['shared'] >> 10} KiB | per iteration: HGMMA {c['hgmma']} ({','.join(e['hgmma_shapes'])}) "
              f"DEPBAR {c['warpgroup.depbar']} UTMALDG {c['utmaldg']} LDGSTS {c['ldgsts']} EX2 {c['mufu.ex2']} "
              f"BAR {c['bar.sync']} FMUL {c['fmul']} all {e['loop_instructions']} | flops/ideal "
              f"{e['mma_flops_over_ideal']} exp/logit {e['exponentials_per_logit']} | under a wgmma in flight: EX2 "
              f"{e['ex2_under_mma']} UTMALDG {e['utmaldg_under_mma']} | ptxas warnings: "
              f"{e['ptxas_warnings'] or 'none'}")
        if "consumer_loops" in e:
            print("    consumer loops: " + "; ".join(
                f"HGMMA {c['hgmma']} DEPBAR {c['warpgroup.depbar']} UTMALDG {c['utmaldg']} EX2 {c['mufu.ex2']} "
                f"BAR {c['bar.sync']} LDL/STL {c['local']} all {c['instructions']}" for c in e["consumer_loops"]))
        if "cycle_model" in e:
            m = e["cycle_model"]
            print(f"    cycle model: {m['clocks_per_tile']} clocks a tile ({m['fraction_of_peak']:.0%} of bf16 peak), "
                  f"serialized {m['clocks_serialized']}, pipelined {m['clocks_pipelined']}; {m['components']}")
    if args.json:
        args.json.write_text(json.dumps(dict(triton=triton.__version__, entries=entries), indent=1) + "\n")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
