#!/usr/bin/env python
"""What the compiler makes of the Triton kernels, without a GPU: a stand-in for
GPU measurements until one is available.

    python benchmarks/compiled.py                    # sm_80/86/90/100, D=512, every kernel, dtype and config
    python benchmarks/compiled.py --targets 90 --dtypes bf16 --dim 512 --cubins /tmp/cubins
    /path/to/venv-with-triton-3.6/bin/python benchmarks/compiled.py --merge   # add another Triton's report

For every target it compiles, as a GPU run would, every kernel and constexpr
variant that can launch at that D (KERNELS; other modules append theirs to
EXTRA_KERNELS):

- the queue pass, for every configuration the dispatcher can choose there
  (dcq_ops.triton.configs.tile_configs: the first is the default, the autotuner
  tries them all), with and without the gradient accumulator, with and without
  inter-class filtering (FILTER: interclass_filtering_threshold > 0);
- the repair kernel (after a queue pass with the gradient) at the tiles
  dcq_ops.triton.launch.repair_tile gives each configuration, with and without
  filtering;
- the merge kernel, writing merged partials or finalizing (the loss and the
  gradient), with and without the gradient, at every (BLOCK_R, BLOCK_S) that
  launch.merge_blocks can choose at that D;
- with ``--specializations``, also every other kernel that Triton's value
  specialisations of the launches' integers make (a 1 a constant, a multiple of
  16 a divisibility hint; kernel_variants.LAUNCHES: num_splits = 1, sizes not
  multiples of 16, ...): today the merge kernel's num_splits = 1 only, since the
  queue pass and the repair specialise none of num_splits, queue_size and
  split_size and are launched with the rows padded to a multiple of 16 (each
  entry lists the launches that compile its kernel: ``launches``). CI runs it.

For each it reads:

- registers per thread, spill bytes and ptxas's warnings and performance
  advisories (C7510/C7515/C7516 ...): Triton's own ptxas command, its log kept
  (triton_compile.ptxas_log); the shared memory (Triton's metadata) against
  the target's limit;
- in the queue-pass loop (the PTX loop that holds the MMAs): the MMA
  instructions per iteration and their FLOPs divided by the ideal, two GEMMs
  of BLOCK_M x BLOCK_K x D done once each (one without the gradient; > 1:
  warps repeat each other's work); the exponentials (ex2) per logit (ideal: 1);
- in the TTGIR: the layout of each of the two dots (``warpsPerCTA`` of the
  cosine product q W^T and of P W; for tcgen05 the tensor-memory block), and
  how Triton specialised the kernel's ``chain_break`` argument (it must stay a
  run-time value, see dcq_ops/triton/kernels.py);
- on sm_90, the SASS of the loop (sass_counts: HGMMA, their waits, TMA and
  cp.async loads, exponentials, barriers) and the per-tile cycle model of the
  16-bit queue pass with the gradient (cycle_model.cycle_model).

On sm_90 it compiles the two Gluon queue passes too (benchmarks/hopper_sass.py's
variants_for, in EXTRA_KERNELS): the pipelined kernel (dcq_ops/triton/hopper.py)
and the seesaw (dcq_ops/triton/hopper_seesaw_kernel.py, the ranked chain's first: the
``default``), bf16 and fp16, with the gradient and without. The seesaw's two
consumer warpgroups each run their own loop over the tiles, so its counts and its
cycle model read consumer 0's loop (one tile an iteration, one warpgroup's MMAs:
Variant.consumer_loops), and its entry lists every consumer loop
(``consumer_loops``: HGMMA, waits, TMA loads, exponentials, barriers, local-memory
accesses, instructions).

``--cubins DIR`` writes each kernel's cubin there, named by target, kernel,
dtype and configuration; its entry holds the path (``cubin``).

Writes benchmarks/results/compiled.json: one report per Triton version
(``reports``, keyed by version; ``--merge`` keeps the other versions' reports
of the file), each with one entry per kernel and variant, and a summary
of each target's default (its ratios and why they are what they are); prints a
table. Exit status 1 when a kernel does not compile, spills, or needs more
shared memory than the target has, or when the sm_90 16-bit default exceeds
the ideal work (MMA FLOPs / ideal above 1.0, exponentials per logit above
1.125: see IDEAL_WORK): CI runs it.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import triton_compile  # noqa: E402,F401  (first: it takes Triton out of interpreter mode)
import triton  # noqa: E402
from triton_compile import ptxas_log  # noqa: E402
from common import cpu_model, meta, write_json  # noqa: E402
from cycle_model import cycle_model  # noqa: E402
from kernel_variants import (DTYPES, EXTRA_KERNELS, KERNELS, SPECIALIZATIONS, TARGETS, Variant,  # noqa: E402,F401
                             kernels, launch)
from sass_counts import count, disassemble, mma_loop  # noqa: E402
import kernel_variants  # noqa: E402

from dcq_ops.triton.configs import ARCHITECTURES, mma_family  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "compiled.json"

# Why a target's 16-bit default is not at the ideal (printed and written with its ratios).
REASONS = {
    "mma.sync": "mma.sync: Triton links the two dots through their shared operand, the queue tile W (a backward "
                "slice, which the kernel's branch does not hide), and puts every warp along BLOCK_K (first dot "
                "{layout}): {per_warp} columns a warp against the n8 of an MMA",
    "mma.sync ideal": ", so each MMA is issued once, but a queue tile serves {rows} rows only: (32, 32, 8, 2) exceeds "
                      "the shared-memory estimate here and (32, 32, 4, 2) spills",
    "mma.sync repeated": " repeats the first GEMM {repeat}x; BLOCK_K >= 8 x warps would be ideal: (32, 32, 4, 2) "
                         "spills, (64, 64, 8, 1) needs 192 KiB and spills, (16, 32, 4, 2) is ideal but serves 16 "
                         "rows a queue tile (an autotuner candidate)",
    "wgmma": "wgmma: the first dot {layout}",
    "tcgen05": "tcgen05: one thread issues each MMA into tensor memory (first dot {layout}), so warps never "
               "repeat an MMA; its shape lives in a run-time descriptor, hence no FLOPs ratio",
    "seesaw": "Gluon seesaw, first in the ranked sm_90 chain (behind its probe; the pipelined and the classic "
              "kernel its fallbacks): two consumer warpgroups take the TMA-loaded queue tiles in turn, each "
              "its tile's S GEMM and half of two tiles' P W (counted per iteration of consumer 0's loop)",
}



# The Gluon sm_90 queue passes (dcq_ops/triton/hopper_launch.CHAIN: the seesaw,
# dcq_ops/triton/hopper_seesaw_kernel.py, then the pipelined kernel, dcq_ops/triton/hopper.py):
# their variants and SASS reading live in benchmarks/hopper_sass.py.
from hopper_sass import variants_for as _hopper_variants  # noqa: E402
EXTRA_KERNELS.append(_hopper_variants(Variant))


def _cubin_name(e: dict) -> str:
    config = (f"m{e['BLOCK_M']}k{e['BLOCK_K']}w{e['num_warps']}s{e['num_stages']}" if "BLOCK_M" in e
              else f"r{e.get('BLOCK_R')}s{e.get('BLOCK_S')}w{e.get('num_warps')}")
    flags = ("grad" if e.get("gradient", True) else "loss") + ("_filter" if e.get("filter") else "")
    special = next((f"_{k}" for k, v in SPECIALIZATIONS.items() if e.get("specialization") == v), "")
    return f"{e['target']}_{e['kernel']}_{e['dtype']}_{config}_{flags}{special}.cubin"


_MODEL_KEYS = ("components", "clocks_per_tile", "clocks_serialized", "clocks_pipelined", "serialized",
               "softmax_under_mma", "fraction_of_peak", "ms_at_benchmark", "load_structure", "assumptions")
_SASS_KEYS = ("hgmma", "hgmma_shapes", "hgmma_a_in_registers", "warpgroup_depbar", "warpgroup_arrive", "utmaldg",
              "ldgsts", "mbarrier_waits", "mufu_ex2", "bar_sync", "local_accesses", "instructions", "non_mma")
_CONSUMER_KEYS = ("hgmma", "warpgroup_depbar", "utmaldg", "mufu_ex2", "bar_sync", "local_accesses", "instructions")

_JOBS: list = []  # (Variant, arch, cubin directory): read by the workers by index (forked)


def sass_loops(sass: str, consumer_loops=None) -> dict:
    """The entry's SASS loop fields: ``sass_loop``, the counts per iteration of the loop
    with the most MMA instructions, or with ``consumer_loops`` (a Variant's: sass ->
    the loop body of each consumer) of the first consumer's loop, and then each
    consumer loop's counts (``consumer_loops``). Empty without such a loop."""
    if consumer_loops is None:
        loop = mma_loop(sass)
        bodies = [] if loop is None else [loop.body]
    else:
        bodies = consumer_loops(sass)
    if not bodies:
        return {}
    counts = [count(body) for body in bodies]
    out = dict(sass_loop={k: counts[0][k] for k in _SASS_KEYS})
    if consumer_loops is not None:
        out["consumer_loops"] = [{k: c[k] for k in _CONSUMER_KEYS} for c in counts]
    return out


def _compile_one(index: int) -> dict:
    """Compile one variant and read it (a worker's task): the entry, or its error."""
    variant, arch, cubins = _JOBS[index]
    entry = dict(variant.entry)
    try:
        compiled, extra = variant.build()
        entry.update(extra)
        entry.update(ptxas_log(compiled, arch), shared=compiled.metadata.shared)
        if cubins is not None:
            path = Path(cubins) / _cubin_name(entry)
            path.write_bytes(compiled.asm["cubin"])
            entry["cubin"] = str(path)
        if arch == 90 and not entry["kernel"].startswith("merge"):
            sass = disassemble(compiled.asm["cubin"])
            entry.update(sass_loops(sass, variant.consumer_loops))
            if variant.model and "sass_loop" in entry:
                model = cycle_model(sass, **variant.model)
                entry["cycle_model"] = {k: model[k] for k in _MODEL_KEYS}
    except Exception as exc:  # noqa: BLE001 - every failure is reported
        entry.update(error=f"{type(exc).__name__}: {str(exc)[:300]}")
    return entry


def compile_all(variants: list[tuple[Variant, int]], cubins: Path | None, jobs: int) -> list[dict]:
    """Entries of every (variant, arch), compiled by ``jobs`` forked workers (1: in this process)."""
    _JOBS[:] = [(v, arch, cubins) for v, arch in variants]
    if jobs <= 1 or len(_JOBS) <= 1:
        return [_compile_one(i) for i in range(len(_JOBS))]
    with multiprocessing.get_context("fork").Pool(jobs) as pool:
        return pool.map(_compile_one, range(len(_JOBS)), chunksize=1)


def judge(entry: dict, ideal) -> bool:
    """Whether an entry fails: an error, a spill, shared memory over the target's limit,
    or (``ideal``) more than the ideal work. Sets entry["ok"] (and "error" on the work)."""
    limit = ARCHITECTURES[entry["target"]].shared_memory_per_block_optin
    bad = "error" in entry or entry["spill_bytes"] > 0 or entry["shared"] > limit
    if ideal and not bad:
        flops, exps = entry["mma_flops_over_ideal"], entry["exponentials_per_logit"]
        if flops is None or flops > ideal[0] or exps is None or exps > ideal[1] or \
                entry["chain_break"].startswith("constexpr"):
            entry["error"] = (f"above the ideal work: MMA FLOPs / ideal {flops} (at most {ideal[0]}), exponentials "
                              f"per logit {exps} (at most {ideal[1]}), first dot {entry.get('first_dot_layout')}, "
                              f"chain_break {entry['chain_break']}")
            bad = True
    entry["ok"] = not bad
    return bad


def _line(e: dict) -> str:
    limit = ARCHITECTURES[e["target"]].shared_memory_per_block_optin
    if "error" in e and "registers" not in e:
        return f"FAIL {e['target']} {e['kernel']} {e['dtype']}: {e['error']}"
    tiles = (f"M{e['BLOCK_M']} K{e['BLOCK_K']} w{e['num_warps']} s{e['num_stages']}" if "BLOCK_M" in e
             else f"R{e.get('BLOCK_R')} S{e.get('BLOCK_S')}")
    flags = ("grad" if e.get("gradient", True) else "loss") + ("+filt" if e.get("filter") else "     ")
    if e.get("specialization"):
        flags += " (" + e["specialization"].split(" (")[0] + ")"
    loop = ""
    if "mma_flops_over_ideal" in e:  # the queue passes (the classic one, the Gluon kernels)
        loop = (f" | MMA/iter {e['mma_instructions_per_iteration']} flops/ideal {e['mma_flops_over_ideal']} "
                f"exp/logit {e['exponentials_per_logit']}")
        loop += f" | dot1 {e['first_dot_layout']}" if "first_dot_layout" in e else ""
    if "consumer_loops" in e:  # a warp-specialized kernel: each consumer's own loop
        loops = e["consumer_loops"]
        loop += (f" | {len(loops)} consumer loops: HGMMA {'/'.join(str(c['hgmma']) for c in loops)} DEPBAR "
                 f"{'/'.join(str(c['warpgroup_depbar']) for c in loops)} UTMALDG "
                 f"{'/'.join(str(c['utmaldg']) for c in loops)}")
    if "cycle_model" in e:
        m = e["cycle_model"]
        loop += f" | model {m['clocks_per_tile']} clk/tile, {m['fraction_of_peak']:.0%} of peak"
    advisories = e.get("ptxas_warnings") or []
    warn = (f" | ptxas: {len(advisories)} advisor{'y' if len(advisories) == 1 else 'ies'}"
            if advisories or "sass_loop" in e else "")
    return (f"{'ok  ' if e['ok'] else 'FAIL'} {e['target']} {e['kernel']:<14} {e['dtype']:<4} {flags} "
            f"{tiles:<18} regs {e['registers']:>3} spill {e['spill_bytes']:>4} B shared {e['shared'] >> 10:>3}/"
            f"{limit >> 10} KiB{loop}{warn}" + (f"\n     {e['error']}" if "error" in e else ""))


def default_summary(entries: list[dict]) -> list[dict]:
    """The default configuration of each target and dtype with the gradient (the
    training case): its ratios, the first dot's layout and why; on sm_90 also the Gluon
    kernel a launch tries first (hopper_launch.CHAIN's, the entry's ``chain_rank`` 0)."""
    out = []
    for e in entries:
        classic = e["kernel"] == "queue_pass" and e["default"] and not e["filter"]
        gluon_first = e.get("chain_rank") == 0 and e["default"]  # compiled with filtering only
        if not (classic or gluon_first) or not e["gradient"] or "specialization" in e or "error" in e:
            continue
        family = mma_family(ARCHITECTURES[e["target"]].capability)
        flops, exps = e["mma_flops_over_ideal"], e["exponentials_per_logit"]
        layout = e.get("first_dot_layout")
        if gluon_first:
            reason = REASONS.get(e.get("schedule"), f"Gluon {e['kernel']}, first in the ranked sm_90 chain")
        elif family == "mma.sync" and e["dtype"] in ("bf16", "fp16"):
            warps_k = (e.get("first_dot_warps_per_cta") or [1, 1])[1]
            per_warp = e["BLOCK_K"] // warps_k
            reason = REASONS[family].format(layout=layout, per_warp=per_warp) + (
                REASONS["mma.sync ideal"].format(rows=e["BLOCK_M"]) if flops is not None and flops <= 1.0
                else REASONS["mma.sync repeated"].format(repeat=max(1, 8 // max(1, per_warp))))
        elif family == "wgmma" and e["dtype"] in ("bf16", "fp16"):
            reason = (REASONS[family].format(layout=layout) + (
                ": each warpgroup computes half of BLOCK_K, P passes through shared memory (ideal)"
                if flops is not None and flops <= 1.0 else ": both warpgroups compute the whole cosine tile"))
        elif family == "tcgen05" and e["dtype"] in ("bf16", "fp16"):
            reason = REASONS[family].format(layout=layout)
        elif e["dtype"] == "fp32":
            reason = "exact fp32 products run on the FMA units (no MMA); thin tiles keep the operands in registers"
        else:
            reason = (f"TF32 on mma.sync (m16n8k8), first dot {layout}: the dots linked as with 16 bits; the first "
                      "candidate that fits without spilling")
        out.append(dict(target=e["target"], kernel=e["kernel"], dtype=e["dtype"],
                        tiles=f"{e['BLOCK_M']}x{e['BLOCK_K']}",
                        num_warps=e["num_warps"], num_stages=e["num_stages"], mma_flops_over_ideal=flops,
                        exponentials_per_logit=exps, first_dot_layout=layout, reason=reason,
                        ptxas_warnings=e.get("ptxas_warnings"), sass_loop=e.get("sass_loop"),
                        cycle_model=e.get("cycle_model")))
    return out



def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--targets", default="80,86,90,100", help="compute capabilities x10, comma-separated")
    parser.add_argument("--dtypes", default="bf16,fp16,fp32,tf32", help=f"subset of {','.join(DTYPES)}")
    parser.add_argument("--dim", type=int, default=512, help="embedding size D (the kernel benchmark's: 512)")
    parser.add_argument("--first-only", action="store_true",
                        help="only the default configuration of each queue pass (and its repair)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--cubins", type=Path, default=None, help="write each kernel's cubin into this directory")
    parser.add_argument("--jobs", type=int, default=1, help="compile in this many processes")
    parser.add_argument("--specializations", action="store_true",
                        help="also the kernels Triton's value specialisations of other launches make "
                             "(kernel_variants.LAUNCHES)")
    parser.add_argument("--merge", action="store_true",
                        help="keep the reports of other Triton versions already in --out (this version's is replaced)")
    args = parser.parse_args(argv)
    run_meta = meta("compiled.py", sys.argv[1:] if argv is None else argv, note="compiled without a GPU")
    try:
        arches = [int(t) for t in args.targets.split(",")]
        unknown = [t for t in arches if t not in TARGETS]
    except ValueError:
        unknown = [args.targets]
    if unknown:
        parser.error(f"--targets must be among {','.join(map(str, TARGETS))}, got {args.targets!r}")
    dtypes = args.dtypes.split(",")
    if any(d not in DTYPES for d in dtypes):
        parser.error(f"--dtypes must be among {','.join(DTYPES)}, got {args.dtypes!r}")
    if args.jobs < 1:
        parser.error(f"--jobs must be positive, got {args.jobs}")
    if args.cubins is not None:
        args.cubins.mkdir(parents=True, exist_ok=True)

    kernel_variants.SPECIALIZE = args.specializations
    print(f"triton {triton.__version__}, D={args.dim}")
    variants = [(v, arch) for arch in arches for family in KERNELS + EXTRA_KERNELS
                for v in family(arch, dtypes, args.dim, args.first_only)]
    entries = compile_all(variants, args.cubins, args.jobs)
    failures = 0
    for (variant, _), e in zip(variants, entries):
        failures += judge(e, variant.ideal_work)
        print(_line(e))
    summary = default_summary(entries)
    print("defaults with the gradient (the training case):")
    for s in summary:
        print(f"  {s['target']:<6} {s['kernel']} {s['dtype']:<4} {s['tiles']:<6} w{s['num_warps']} s{s['num_stages']}: "
              f"flops/ideal {s['mma_flops_over_ideal']}, exp/logit {s['exponentials_per_logit']}; {s['reason']}")
        if s.get("cycle_model"):
            m = s["cycle_model"]
            print(f"         cycle model: {m['clocks_per_tile']} clocks a tile ({m['components']}), "
                  f"{'serialized' if m['serialized'] else 'pipelined'}, {m['fraction_of_peak']:.0%} of bf16 peak, "
                  f"{m['ms_at_benchmark']} ms at N=4096, K=2^20, D=512")
    report = dict(meta=run_meta, triton=triton.__version__, dim=args.dim, host=cpu_model(),
                  note="compiled without a GPU; FLOPs/ideal > 1 means warps repeat each other's MMAs",
                  defaults=summary, entries=entries)
    reports = {}
    if args.merge and args.out.exists():
        try:
            reports = json.loads(args.out.read_text()).get("reports", {})
        except (json.JSONDecodeError, AttributeError):
            reports = {}
    reports[triton.__version__] = report
    reports = dict(sorted(reports.items(), key=lambda kv: [int(p) for p in re.findall(r"\d+", kv[0])[:3]],
                          reverse=True))
    write_json(args.out, dict(triton_versions=list(reports), dim=args.dim, reports=reports), run_meta)
    print(f"{failures} failure(s) in {len(entries)} kernels; wrote {args.out} (reports of Triton "
          f"{', '.join(reports)})")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
