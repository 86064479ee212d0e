"""The kernels benchmarks/compiled.py compiles: every kernel and constexpr variant of
dcq_ops.triton.kernels that can launch at a given D, each a Variant (what identifies
it in the report, how to compile it, its cycle-model tile, the work it must not exceed).

Entry points: ``KERNELS`` (functions (arch, dtypes, dim, first_only) -> [Variant]),
``EXTRA_KERNELS`` (the same, appended by other modules: e.g. a Hopper-only queue
pass), and the builders ``queue_pass``, ``repair``, ``merge_kernel``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import triton_compile  # noqa: F401  (first: it takes Triton out of interpreter mode)
from ptx_counts import dot_layouts, loop_counts
from triton_compile import compile_kernel, launch_specialization

from dcq_ops.triton import kernels, launch
from dcq_ops.triton.configs import ARCHITECTURES, block_d_of, mma_family, tile_configs

DTYPES = {"bf16": ("bf16", 2, None), "fp16": ("fp16", 2, None), "fp32": ("fp32", 4, "ieee"),
          "tf32": ("fp32", 4, "tf32")}
TARGETS = {80: "sm_80", 86: "sm_86", 89: "sm_89", 90: "sm_90", 100: "sm_100"}

# The work the default configuration of a target must not exceed (MMA FLOPs / ideal,
# exponentials per logit), per (target, dtype): the 16-bit defaults of sm_90, where
# the first dot laid out [4, 2] gives ideal work (dcq_ops/triton/kernels.py). 1.125:
# one exponential a logit plus the rescaling factors of the row maxima (two rows per
# thread of a 64 x 32 wgmma fragment, 16 logits a thread).
IDEAL_WORK = {("sm_90", "bf16"): (1.0, 1.125), ("sm_90", "fp16"): (1.0, 1.125)}


@dataclass
class Variant:
    """One kernel to compile: what identifies it in the report (``entry``: target,
    kernel, dtype, configuration, variant flags), how to compile it (``build``:
    () -> (compiled kernel, extra entry fields)), and, for the cycle model, its
    tile and warps (``model``: keyword arguments of cycle_model.cycle_model) or None,
    and on sm_90 which SASS loop its counts read (``consumer_loops``)."""

    entry: dict
    build: Callable
    model: dict | None = None
    ideal_work: tuple | None = None  # (MMA FLOPs / ideal, exponentials per logit) it must not exceed
    tags: list = field(default_factory=list)
    # None: the SASS counts read the loop with the most MMA instructions
    # (sass_counts.mma_loop). A warp-specialized kernel whose consumers each run
    # their own loop over the tiles gives sass -> [loop body of each consumer]
    # (e.g. benchmarks/hopper_sass.consumer_loops): the counts per iteration read
    # the first, and each is listed in the entry's "consumer_loops" (the dispatch
    # loop around the partitions, which holds them all, is not one iteration).
    consumer_loops: Callable | None = None


def _queue_signature(dtype: str, keys: bool):
    pointers = dict(q_ptr=f"*{dtype}", labels_ptr="*i64", w_ptr=f"*{dtype}", queue_labels_ptr="*i64",
                    max_ws_ptr="*fp32", sum_ws_ptr="*fp32", acc_ws_ptr="*fp32")
    scalars = dict(num_rows="i32", queue_size="i32", dim="i32", num_splits="i32", split_size="i32",
                   scale_log2="fp32", interclass_filtering_threshold="fp32", chain_break="i32")
    if keys:  # the queue pass's autotuning keys
        scalars.update(row_bucket="i32", split_bucket="i32")
    return pointers, scalars


# Triton's launcher specialises integer arguments by value too: a 1 becomes a constant, a
# multiple of 16 gets a divisibility hint, and each specialisation is a kernel of its own.
# The report compiles each kernel for the values of LAUNCHES[None] (sizes multiples of
# 16), and with --specializations also for the values of every other launch below where
# Triton's launcher, given the kernel's do_not_specialize flags (kernels.RUNTIME_INTEGERS)
# and the rows as launched (launch.padded_rows), would compile another kernel: today none
# of the queue pass and repair (each launch below compiles the kernel of LAUNCHES[None]),
# the merge kernel's num_splits = 1.
SPECIALIZATIONS = {
    "one_split": "num_splits = 1",
    "unaligned": "num_rows, queue_size, split_size not multiples of 16",
    "many_splits": "num_splits a multiple of 16",
    "one_row": "num_rows = 1, queue_size = 1 (one row, a queue of one entry)",
    "empty_queue": "queue_size = 0, split_size = 1, num_splits = 1 (an empty queue)",
}
LAUNCHES = {
    None: dict(num_rows=4096, queue_size=1 << 20, num_splits=8, split_size=1 << 17),
    "one_split": dict(num_rows=4096, queue_size=1 << 20, num_splits=1, split_size=1 << 20),
    "unaligned": dict(num_rows=4095, queue_size=100_003, num_splits=8, split_size=12_501),
    "many_splits": dict(num_rows=4096, queue_size=1 << 20, num_splits=16, split_size=1 << 16),
    "one_row": dict(num_rows=1, queue_size=1, num_splits=1, split_size=1),
    "empty_queue": dict(num_rows=4096, queue_size=0, num_splits=1, split_size=1),
}
LAUNCH_SIZES = "sizes multiples of 16"  # LAUNCHES[None], in the entries' "launches"
# Whether the variants include the other LAUNCHES' kernels (compiled.py --specializations).
SPECIALIZE = False


def launch_integers(fn, dim: int, keys: bool, specialization: str | None = None) -> dict:
    """How Triton's launcher specialises each integer argument of a queue-pass-grid kernel
    ``fn`` for the values of LAUNCHES[specialization] at embedding size ``dim``: name ->
    (type, attribute), ("constexpr", value) where it folds the value. The rows as the
    launch passes them (launch.padded_rows); ``keys``: the queue pass's autotuning keys."""
    values = LAUNCHES[specialization]
    ints = dict(values, num_rows=launch.padded_rows(values["num_rows"]), dim=dim, chain_break=kernels.CHAIN_BREAK)
    if keys:  # as launch.queue_pass computes them
        ints.update(row_bucket=max(16, 1 << max(0, values["num_rows"] - 1).bit_length()),
                    split_bucket=1 << max(0, values["split_size"] - 1).bit_length())
    return {name: tuple(launch_specialization(fn, name, value)) for name, value in ints.items()}


def specialization_groups(fn, dim: int, keys: bool) -> dict:
    """The kernels that the LAUNCHES compile ``fn`` into: the first launch of each
    distinct kernel (None: LAUNCHES[None]'s) -> the names of SPECIALIZATIONS that
    compile that same kernel."""
    groups, first = {None: []}, {tuple(sorted(launch_integers(fn, dim, keys).items())): None}
    for name in SPECIALIZATIONS:
        key = tuple(sorted(launch_integers(fn, dim, keys, name).items()))
        groups.setdefault(first.setdefault(key, name), []).append(name)
    return groups


def _compile_queue_kernel(fn, dtype: str, precision, block_d: int, config, flags: dict, arch: int, keys: bool,
                          specialization: str | None = None, dim: int | None = None):
    """A queue-pass-grid kernel (queue pass or repair) as the launches specialise it:
    (compiled, how chain_break was specialised)."""
    pointers, scalars = _queue_signature(dtype, keys)
    constants = dict(flags, INPUT_PRECISION=precision, BLOCK_M=config.block_m, BLOCK_K=config.block_k,
                     BLOCK_D=block_d)
    aligned = list(pointers)
    integers = launch_integers(fn, block_d if dim is None else dim, keys, specialization)
    for name, (kind, attribute) in integers.items():
        if kind == "constexpr":
            del scalars[name]
            constants[name] = attribute
        elif attribute == "D":
            aligned.append(name)
    compiled = compile_kernel(fn, dict(pointers, **scalars), constants, aligned, arch,
                              num_warps=config.num_warps, num_stages=config.num_stages)
    kind, attribute = integers["chain_break"]
    return compiled, f"{kind}" + (" (divisible by 16)" if attribute == "D" else "")


def queue_pass(dtype: str, precision, block_d: int, config, compute_grad: bool, arch: int, filtering: bool = True,
               specialization: str | None = None, dim: int | None = None):
    """The queue-pass kernel compiled for ``arch`` as the launch of LAUNCHES[specialization]
    specialises it: (compiled, how chain_break was specialised)."""
    return _compile_queue_kernel(kernels.queue_pass_kernel, dtype, precision, block_d, config,
                                 dict(FILTER=filtering, COMPUTE_GRAD=compute_grad), arch, keys=True,
                                 specialization=specialization, dim=dim)


def repair(dtype: str, precision, block_d: int, config, arch: int, filtering: bool,
           specialization: str | None = None, dim: int | None = None):
    """The repair kernel compiled for ``arch`` at ``config`` (a launch.repair_tile)."""
    return _compile_queue_kernel(kernels.repair_kernel, dtype, precision, block_d, config,
                                 dict(FILTER=filtering), arch, keys=False, specialization=specialization, dim=dim)


def merge_kernel(block_d: int, finalize: bool, arch: int, compute_grad: bool = True, blocks=None,
                 one_split: bool = False):
    """The merge kernel (finalizing or not) at (BLOCK_R, BLOCK_S) ``blocks`` (default:
    the plan of N=4096 rows, 8 splits, 264 programs); ``one_split``: num_splits = 1,
    which Triton's launcher turns into a constant."""
    block_r, block_s = blocks or launch.merge_blocks(4096, 8, block_d, programs=264)
    pointers = {name: "*fp32" for name in ("max_ws_ptr", "sum_ws_ptr", "acc_ws_ptr", "out_max_ptr", "out_sum_ptr",
                                           "out_acc_ptr", "pos_logit_ptr", "pos_slope_ptr", "q_ptr", "w_ptr",
                                           "inv_norm_ptr", "loss_ptr", "grad_ptr")}
    if finalize:
        pointers["inv_norm_ptr"] = "*fp64"  # 1 / ||x||, below fp32's normal range for rows near 1e38
    scalars = dict(num_rows="i32", dim="i32", num_splits="i32", scale="fp32")
    constants = dict(FINALIZE=finalize, COMPUTE_GRAD=compute_grad, BLOCK_R=block_r, BLOCK_S=block_s,
                     BLOCK_D=block_d)
    if one_split:
        del scalars["num_splits"]
        constants = dict(num_splits=1, **constants)
    compiled = compile_kernel(kernels.merge_kernel, dict(pointers, **scalars), constants,
                              list(pointers) + ["dim"], arch, num_warps=4)
    return compiled, dict(BLOCK_R=block_r, BLOCK_S=block_s, num_warps=4)


def merge_block_plans(block_d: int) -> list[tuple[int, int]]:
    """Every (BLOCK_R, BLOCK_S) launch.merge_blocks can choose at this BLOCK_D (rows and
    splits over powers of two, one program to a few thousand), the default plan first."""
    default = launch.merge_blocks(4096, 8, block_d, programs=264)
    plans = {default}
    for rows in (2**i for i in range(0, 21)):
        for splits in (2**i for i in range(0, 18)):
            for programs in (1, 2 * 16, 2 * 132, 2 * 1024):
                plans.add(launch.merge_blocks(rows, splits, block_d, programs=programs))
    return [default] + sorted(plans - {default})


def queue_pass_variants(arch: int, dtypes: list[str], dim: int, first_only: bool) -> list[Variant]:
    """The queue pass of every configuration, with and without the gradient and filtering;
    the repair kernel at each configuration's repair tiles, with and without filtering;
    with SPECIALIZE, each of them also for every launch of SPECIALIZATIONS that compiles
    another kernel (specialization_groups). Each entry names the launches that compile
    its kernel (``launches``)."""
    target = ARCHITECTURES[TARGETS[arch]]
    block_d = block_d_of(dim)
    groups = {kernel: specialization_groups(fn, dim, keys) for kernel, fn, keys in (
        ("queue_pass", kernels.queue_pass_kernel, True), ("repair", kernels.repair_kernel, False))}
    specials = {kernel: [s for s in group if s is not None] if SPECIALIZE else [] for kernel, group in groups.items()}

    def launches(kernel, special):
        return [LAUNCH_SIZES] * (special is None) + [SPECIALIZATIONS[s] for s in groups[kernel][special]]
    out = []
    for name in dtypes:
        dtype, element_size, precision = DTYPES[name]
        configs = tile_configs(target, element_size, dim, tf32=precision == "tf32")
        repairs = {}
        for rank, config in enumerate(configs[:1] if first_only else configs):
            repairs.setdefault(launch.repair_tile(config, fma=precision == "ieee"), []).append(rank)
            flags = [(g, f, s) for s in [None] + specials["queue_pass"] for g in (True, False) for f in (False, True)]
            for compute_grad, filtering, special in flags:
                entry = dict(target=target.name, kernel="queue_pass", gradient=compute_grad, filter=filtering,
                             dtype=name, default=rank == 0, BLOCK_D=block_d, **config.as_dict(),
                             shared_estimate=config.shared_bytes(block_d, element_size,
                                                                 mma_family(target.capability)),
                             launches=launches("queue_pass", special))
                if special:
                    entry["specialization"] = SPECIALIZATIONS[special]

                def build(config=config, compute_grad=compute_grad, filtering=filtering, special=special,
                          dtype=dtype, precision=precision):
                    compiled, chain_break = queue_pass(dtype, precision, block_d, config, compute_grad, arch,
                                                       filtering, special, dim)
                    return compiled, dict(
                        **loop_counts(compiled.asm["ptx"], config, block_d, 2 if compute_grad else 1),
                        **dot_layouts(compiled.asm["ttgir"], config, block_d), chain_break=chain_break)
                model = (dict(tile_m=config.block_m, tile_n=config.block_k, dim=dim, warps=config.num_warps,
                              num_stages=config.num_stages, gemms=2)
                         if arch == 90 and compute_grad and element_size == 2 else None)
                ideal = IDEAL_WORK.get((target.name, name)) if rank == 0 else None
                out.append(Variant(entry, build, model if not special else None, ideal))
        for tile, ranks in repairs.items():
            flags = [(f, s) for s in [None] + specials["repair"] for f in (False, True)]
            for filtering, special in flags:
                entry = dict(target=target.name, kernel="repair", gradient=True, filter=filtering, dtype=name,
                             default=0 in ranks, BLOCK_D=block_d, **tile.as_dict(),
                             after_configs=[configs[r].as_dict() for r in ranks], launches=launches("repair", special))
                if special:
                    entry["specialization"] = SPECIALIZATIONS[special]

                def build(tile=tile, filtering=filtering, special=special, dtype=dtype, precision=precision):
                    compiled, chain_break = repair(dtype, precision, block_d, tile, arch, filtering, special, dim)
                    return compiled, dict(chain_break=chain_break)
                out.append(Variant(entry, build))
    return out


def merge_variants(arch: int, dtypes: list[str], dim: int, first_only: bool) -> list[Variant]:
    """The merge kernel (fp32 workspaces, whatever the GEMMs' dtype): merging or finalizing,
    with and without the gradient, at every block plan; with num_splits = 1 (a constant)
    too where the plan allows one split (BLOCK_S = 2)."""
    target = ARCHITECTURES[TARGETS[arch]]
    block_d = block_d_of(dim)
    out = []
    for rank, blocks in enumerate(merge_block_plans(block_d)):
        for one_split in (False, True) if blocks[1] == 2 and SPECIALIZE else (False,):
            for finalize in (False, True):
                for compute_grad in (True, False):
                    entry = dict(target=target.name, kernel="merge_finalize" if finalize else "merge",
                                 gradient=compute_grad, dtype="fp32", default=rank == 0, BLOCK_D=block_d)
                    if one_split:
                        entry["specialization"] = SPECIALIZATIONS["one_split"]

                    def build(blocks=blocks, finalize=finalize, compute_grad=compute_grad, one_split=one_split):
                        return merge_kernel(block_d, finalize, arch, compute_grad, blocks, one_split)
                    out.append(Variant(entry, build))
    return out


# The kernels the report compiles: functions (arch, dtypes, dim, first_only) -> [Variant].
KERNELS: list = [queue_pass_variants, merge_variants]

# Kernels of other modules (e.g. a Hopper-only queue pass) that the report compiles too,
# the same way: append a function (arch, dtypes, dim, first_only) -> [Variant] that
# returns [] where the kernel does not apply. Give each Variant.entry a unique "kernel"
# name, and Variant.model (cycle_model's tile_m, tile_n, dim, warps, ...) to have its
# cycle model computed; Variant.ideal_work makes the report fail above that work;
# Variant.consumer_loops for a warp-specialized kernel's per-consumer loops.
EXTRA_KERNELS: list = []
