#!/usr/bin/env python
"""What the compiler makes of the Triton kernels, without a GPU: a stand-in for
GPU measurements until one is available.

    python benchmarks/compiled.py                    # sm_80/86/90/100, D=512, every dtype and config
    python benchmarks/compiled.py --targets 90 --dtypes bf16 --dim 512
    /path/to/venv-with-triton-3.6/bin/python benchmarks/compiled.py --merge   # add another Triton's report

For every target and every configuration that the dispatcher can choose there
(dcq_ops.triton.configs.tile_configs: the first is the default, the autotuner
tries them all), it compiles the queue-pass kernel (with and without the
gradient accumulator) and the merge kernel as a GPU run would, then reads:

- registers per thread and spill bytes (``ptxas -v`` on the PTX), and the
  shared memory (Triton's metadata), against the target's limit;
- in the queue-pass loop (the PTX loop that holds the MMAs): the MMA
  instructions per iteration and their FLOPs divided by the ideal, two GEMMs
  of BLOCK_M x BLOCK_K x D done once each (one without the gradient; > 1:
  warps repeat each other's work); the exponentials (ex2) per logit (ideal: 1);
- in the TTGIR: the layout of each of the two dots (``warpsPerCTA`` of the
  cosine product q W^T and of P W; for tcgen05 the tensor-memory block), and
  how Triton specialised the kernel's ``chain_break`` argument (it must stay a
  run-time value, see dcq_ops/triton/kernels.py).

Writes benchmarks/results/compiled.json: one report per Triton version
(``reports``, keyed by version; ``--merge`` keeps the other versions' reports
of the file), each with one entry per kernel and configuration, and a summary
of each target's default (its ratios and why they are what they are); prints a
table. Exit status 1 when a kernel does not compile, spills, or needs more
shared memory than the target has, or when the sm_90 16-bit default exceeds
the ideal work (MMA FLOPs / ideal above 1.0, exponentials per logit above
1.125: see IDEAL_WORK): CI runs it.
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

# The kernels must be decorated for the compiler, not for Triton's CPU interpreter.
os.environ.pop("TRITON_INTERPRET", None)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.nvidia.compiler import CUDABackend, get_ptxas  # noqa: E402
from triton._C.libtriton import native_specialize_impl  # noqa: E402
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

# The work the default configuration of a target must not exceed (MMA FLOPs / ideal,
# exponentials per logit), per (target, dtype): the 16-bit defaults of sm_90, where
# the first dot laid out [4, 2] gives ideal work (dcq_ops/triton/kernels.py). 1.125:
# one exponential a logit plus the rescaling factors of the row maxima (two rows per
# thread of a 64 x 32 wgmma fragment, 16 logits a thread).
IDEAL_WORK = {("sm_90", "bf16"): (1.0, 1.125), ("sm_90", "fp16"): (1.0, 1.125)}

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
}

# FLOPs of one MMA instruction: (regex on the PTX, FLOPs per issue, issued by "warp" or "warpgroup").
_PRED = r"^\s*(?:@!?%p\d+\s+)?"  # an optional predicate
_MMA_SYNC = re.compile(_PRED + r"mma\.sync\.aligned\.m(\d+)n(\d+)k(\d+)", re.M)
_WGMMA = re.compile(_PRED + r"wgmma\.mma_async\.sync\.aligned\.m(\d+)n(\d+)k(\d+)", re.M)
_TCGEN05 = re.compile(_PRED + r"tcgen05\.mma\b", re.M)  # shapes live in a runtime descriptor: counted, not sized
_EX2 = re.compile(_PRED + r"ex2\.approx\.(?:ftz\.)?(f32|f16x2|bf16x2|f16|bf16)\b", re.M)
_LABEL = re.compile(r"^(\$L__\w+):", re.M)
_BRANCH = re.compile(r"^\s*(?:@!?%p\d+\s+)?bra(?:\.uni)?\s+(\$L__\w+);", re.M)


def launch_specialization(fn, name: str, value):
    """How Triton's launcher specialises argument ``name`` of ``fn`` for ``value``: its
    (type, attribute) from the same native function the launcher calls, with the
    kernel's do_not_specialize flags: ("constexpr", value) when it would be folded."""
    param = next(p for p in fn.params if p.name == name)
    return native_specialize_impl(CUDABackend, value, False, not param.do_not_specialize,
                                  not param.do_not_specialize_on_alignment)


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


_LAYOUT_ALIAS = re.compile(r"^(#[\w.]+) = (.+)$", re.M)
_DOT_RESULT = re.compile(r"=\s*(tt\.dot|ttng\.warp_group_dot)\s.*->\s*tensor<(\d+)x(\d+)xf32,\s*(#[\w.]+)")
_TCGEN05_OP = re.compile(r"ttng\.tc_gen5_mma\s.*?:\s*(.*)$")
_MEMDESC = re.compile(r"!ttg\.memdesc<(\d+)x(\d+)x\w+,\s*(#[\w.]+)")


def _layout_name(definition: str) -> str:
    """A layout's short description: warpsPerCTA (and the MMA version), or a tensor-memory block."""
    warps = re.search(r"warpsPerCTA = \[([\d, ]+)\]", definition)
    if "tensor_memory_encoding" in definition:
        block = re.search(r"blockM = (\d+), blockN = (\d+)", definition)
        return f"tmem {block.group(1)}x{block.group(2)}" if block else "tmem"
    kind = "mma v" + re.search(r"versionMajor = (\d+)", definition).group(1) if "nvidia_mma" in definition \
        else definition.split("<")[0].lstrip("#")
    return f"{kind} [{warps.group(1)}]" if warps else kind


def dot_layouts(ttgir: str, config, block_d: int) -> dict:
    """The layouts of the queue pass's dots in the TTGIR: the first dot (the cosines
    q W^T, result [BLOCK_M, BLOCK_K]) and the second (P W, [BLOCK_M, BLOCK_D]); each
    its warpsPerCTA (and the layout's kind), or None without that dot. Pipelining
    may peel copies of a dot; all copies must agree (else the layouts are listed)."""
    aliases = {m.group(1): m.group(2) for m in _LAYOUT_ALIAS.finditer(ttgir)}
    found = {"first": [], "second": []}
    warps = {"first": [], "second": []}
    for line in ttgir.splitlines():
        dot = _DOT_RESULT.search(line)
        if dot:
            shape, layout = (int(dot.group(2)), int(dot.group(3))), dot.group(4)
        else:
            tcgen05 = _TCGEN05_OP.search(line)
            descs = _MEMDESC.findall(tcgen05.group(1)) if tcgen05 else []
            if len(descs) < 3:
                continue
            shape, layout = (int(descs[2][0]), int(descs[2][1])), descs[2][2]  # the accumulator's
        definition = aliases.get(layout, layout)
        which = "first" if shape == (config.block_m, config.block_k) and \
            (config.block_k != block_d or not found["first"]) else "second"
        name = _layout_name(definition)
        if name not in found[which]:
            found[which].append(name)
            match = re.search(r"warpsPerCTA = \[([\d, ]+)\]", definition)
            warps[which].append([int(n) for n in match.group(1).split(",")] if match else None)
    out = {}
    for which in ("first", "second"):
        out[f"{which}_dot_layout"] = " | ".join(found[which]) or None
        out[f"{which}_dot_warps_per_cta"] = warps[which][0] if len(warps[which]) == 1 else None
    return out


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
                   scale_log2="fp32", interclass_filtering_threshold="fp32", chain_break="i32", row_bucket="i32",
                   split_bucket="i32")
    constants = dict(FILTER=True, COMPUTE_GRAD=compute_grad, INPUT_PRECISION=precision,
                     BLOCK_M=config.block_m, BLOCK_K=config.block_k, BLOCK_D=block_d)
    aligned = list(pointers) + ["num_rows", "queue_size", "dim", "split_size"]
    # chain_break as the launcher specialises the value the launches pass (kernels.CHAIN_BREAK).
    kind, attribute = launch_specialization(kernels.queue_pass_kernel, "chain_break", kernels.CHAIN_BREAK)
    if kind == "constexpr":
        del scalars["chain_break"]
        constants = dict(chain_break=kernels.CHAIN_BREAK, **constants)
    elif attribute == "D":
        aligned.append("chain_break")
    compiled = compile_kernel(kernels.queue_pass_kernel, dict(pointers, **scalars), constants, aligned, arch,
                              num_warps=config.num_warps, num_stages=config.num_stages)
    return compiled, f"{kind}" + (" (divisible by 16)" if attribute == "D" else "")


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


def default_summary(entries: list[dict]) -> list[dict]:
    """The default configuration of each target and dtype with the gradient (the
    training case): its ratios, the first dot's layout and why."""
    out = []
    for e in entries:
        if e["kernel"] != "queue_pass" or not e["default"] or not e["gradient"] or "error" in e:
            continue
        family = mma_family(ARCHITECTURES[e["target"]].capability)
        flops, exps = e["mma_flops_over_ideal"], e["exponentials_per_logit"]
        layout = e.get("first_dot_layout")
        if family == "mma.sync" and e["dtype"] in ("bf16", "fp16"):
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
        out.append(dict(target=e["target"], dtype=e["dtype"], tiles=f"{e['BLOCK_M']}x{e['BLOCK_K']}",
                        num_warps=e["num_warps"], num_stages=e["num_stages"], mma_flops_over_ideal=flops,
                        exponentials_per_logit=exps, first_dot_layout=layout, reason=reason))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--targets", default="80,86,90,100", help="compute capabilities x10, comma-separated")
    parser.add_argument("--dtypes", default="bf16,fp16,fp32,tf32", help=f"subset of {','.join(DTYPES)}")
    parser.add_argument("--dim", type=int, default=512, help="embedding size D (the kernel benchmark's: 512)")
    parser.add_argument("--first-only", action="store_true", help="only the default configuration of each")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--merge", action="store_true",
                        help="keep the reports of other Triton versions already in --out (this version's is replaced)")
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
                        compiled, chain_break = queue_pass(dtype, precision, block_d, config, compute_grad, arch)
                        registers, spills = ptxas_report(compiled.asm["ptx"], arch)
                        entry.update(registers=registers, spill_bytes=spills, shared=compiled.metadata.shared,
                                     **loop_counts(compiled.asm["ptx"], config, block_d, 2 if compute_grad else 1),
                                     **dot_layouts(compiled.asm["ttgir"], config, block_d),
                                     chain_break=chain_break)
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
        ideal = IDEAL_WORK.get((e["target"], e["dtype"])) if e["kernel"] == "queue_pass" and e["default"] else None
        if ideal and not bad:
            flops, exps = e["mma_flops_over_ideal"], e["exponentials_per_logit"]
            if flops is None or flops > ideal[0] or exps is None or exps > ideal[1] or \
                    e["chain_break"].startswith("constexpr"):
                e["error"] = (f"above the ideal work: MMA FLOPs / ideal {flops} (at most {ideal[0]}), exponentials "
                              f"per logit {exps} (at most {ideal[1]}), first dot {e['first_dot_layout']}, "
                              f"chain_break {e['chain_break']}")
                bad = True
        e["ok"] = not bad
        failures += bad
        if "error" in e and "registers" not in e:
            print(f"FAIL {e['target']} {e['kernel']} {e['dtype']}: {e['error']}")
            continue
        tiles = (f"M{e['BLOCK_M']} K{e['BLOCK_K']} w{e['num_warps']} s{e['num_stages']}"
                 if e["kernel"] == "queue_pass" else f"R{e['BLOCK_R']} S{e['BLOCK_S']}")
        loop = ""
        if e["kernel"] == "queue_pass":
            loop = (f" | MMA/iter {e['mma_instructions_per_iteration']} flops/ideal {e['mma_flops_over_ideal']} "
                    f"exp/logit {e['exponentials_per_logit']} | dot1 {e['first_dot_layout']}")
        print(f"{'ok  ' if e['ok'] else 'FAIL'} {e['target']} {e['kernel']:<14} {e['dtype']:<4} "
              f"{'grad' if e.get('gradient', True) else 'loss'} {tiles:<18} regs {e['registers']:>3} "
              f"spill {e['spill_bytes']:>4} B shared {e['shared'] >> 10:>3}/{limit >> 10} KiB{loop}"
              + (f"\n     {e['error']}" if "error" in e else ""))
    summary = default_summary(entries)
    print("defaults with the gradient (the training case):")
    for s in summary:
        print(f"  {s['target']:<6} {s['dtype']:<4} {s['tiles']:<6} w{s['num_warps']} s{s['num_stages']}: "
              f"flops/ideal {s['mma_flops_over_ideal']}, exp/logit {s['exponentials_per_logit']}; {s['reason']}")
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
    print(f"{failures} failure(s); wrote {args.out} (reports of Triton {', '.join(reports)})")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
