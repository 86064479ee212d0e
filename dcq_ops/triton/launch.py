"""Launch planning and the launches of the Triton kernels (dcq_ops.triton.kernels).

Planning: the split of the queue across programs (plan_splits, under a
workspace bound), the merge kernel's blocks, the tile configuration of the
device's architecture (dcq_ops.triton.configs) behind an autotuner, and the
GEMMs' input precision. Launches: ``queue_pass`` (the queue-pass kernel, then
the repair kernel), ``merge`` (the merged partials of every row) and
``finalize`` (the loss and gradient rows), all on fp32 workspaces.
"""

from __future__ import annotations

import contextlib
import functools
import os
from typing import NamedTuple

import torch
import triton

from dcq_ops.downgrades import shared_memory_per_block_optin
from dcq_ops.triton import hopper_launch
from dcq_ops.triton.configs import TileConfig, architecture_of, block_d_of, tile_configs
from dcq_ops.triton.kernels import (CHAIN_BREAK, INTERPRETED, LOG2E, merge_kernel, queue_pass_kernel,
                                    repair_kernel)

# Upper bound of the split workspace (partial max, sum and accumulator of each
# row in each split): 96 MiB covers N=4096, K=2^20, D=512 with every SM busy.
WORKSPACE_LIMIT_BYTES = 96 << 20

# Splits are multiples of this many queue entries (the largest BLOCK_K), so
# that no tile but the queue's last one is partial.
SPLIT_ALIGN = 128

# Each split gets at least this many queue entries: a shorter loop would spend
# more time writing its [BLOCK_M, D] partial accumulator than reading the queue.
MIN_SPLIT_SIZE = 512

# The interpreter runs one fixed, small configuration: autotuning there would
# only multiply the (slow) interpreted runs.
_INTERPRETER_CONFIG = TileConfig(block_m=16, block_k=32, num_warps=4, num_stages=1)
_INTERPRETER_SLOTS = 4  # enough splits to exercise the merging of splits

# CUDA's limit on grid dimension 0 (dimensions 1 and 2: 65,535). The queue-pass
# grid is one-dimensional (row blocks x splits, see queue_pass_grid).
MAX_GRID_PROGRAMS = 2**31 - 1

# The queue-pass and repair kernels see a row count padded to a multiple of this
# (padded_rows): Triton's launcher gives such a count a divisibility hint, and the
# kernels compiled without it spill (sm_100's 16-bit default 92-96 B, the exact-fp32
# defaults 12-60 B, Triton 3.6's sm_90 16-bit default 72 B; benchmarks/compiled.py).
# Every BLOCK_M is a multiple of it, so the padding adds no program and no work.
ROW_ALIGN = 16

# Elements of the merge kernel's [BLOCK_R, BLOCK_S, BLOCK_D] tile (32 fp32
# registers a thread at 4 warps).
_MERGE_TILE = 4096


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


# ----------------------------------------------------------------------------
# Devices, dtypes and precision


def check_device(device: torch.device) -> None:
    if device.type != "cuda" and not INTERPRETED:
        raise RuntimeError(
            f"the triton backend runs on CUDA tensors, got tensors on {device}; for CPU tensors set "
            "TRITON_INTERPRET=1 before dcq_ops.triton.kernels is first imported (Triton's interpreter)"
        )


def gemm_dtype_of(queue_dtype: torch.dtype) -> torch.dtype:
    """Both GEMMs take their operands in the queue's dtype (docs/loss.md, "Numerics")."""
    if queue_dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"the triton backend multiplies in float32, float16 or bfloat16 (the queue's dtype), got a "
                        f"{queue_dtype} queue; float64 runs on the 'chunked' or 'reference' backend")
    return queue_dtype


def input_precision(dtype: torch.dtype):
    """fp32 GEMMs honour torch's TF32 setting (exact "ieee" only when the float32
    matmul precision is "highest", as torch.mm); 16-bit operands multiply exactly anyway."""
    if dtype != torch.float32:
        return None
    return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"


@functools.lru_cache(maxsize=None)
def device_architecture(device_index: int):
    """(configs.Architecture, number of multiprocessors) of a CUDA device."""
    props = torch.cuda.get_device_properties(device_index)
    optin = shared_memory_per_block_optin(props, f"cuda:{device_index}")  # says it when torch does not report it
    return architecture_of((props.major, props.minor), optin), props.multi_processor_count


def _device_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def _device_context(device: torch.device):
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


# ----------------------------------------------------------------------------
# Planning


@functools.lru_cache(maxsize=256)
def plan_splits(rows: int, queue_size: int, dim: int, block_m: int, compute_grad: bool,
                slots: int, align: int = SPLIT_ALIGN, min_split: int = MIN_SPLIT_SIZE) -> tuple[int, int]:
    """(split_size, num_splits) of the queue for `slots` programs running at once.

    The main kernel runs one program per multiprocessor at a time (its
    accumulator and tiles take most of the registers and shared memory), so
    its time goes as waves x work per program = ceil(row_blocks*S / slots) * K/S.
    The plan takes the fewest splits within 5% of the fastest (more splits
    cost workspace and merging), with split sizes a multiple of align, at
    least min_split entries per split, and the workspace (an accumulator per
    split with compute_grad) under WORKSPACE_LIMIT_BYTES. A batch of 128 rows
    (2 row blocks) is thus split about slots/2 ways and fills every multiprocessor.
    """
    if queue_size == 0 or rows == 0:
        return max(1, queue_size), 1  # one split (no program at all without rows)
    row_blocks = cdiv(rows, block_m)
    bytes_per_split = rows * 4 * (2 + (dim if compute_grad else 0))
    max_splits = max(1, min(queue_size // min_split, WORKSPACE_LIMIT_BYTES // bytes_per_split))
    sizes = {}  # number of splits -> split size (a multiple of align)
    for splits in range(1, max_splits + 1):
        size = cdiv(cdiv(queue_size, splits), align) * align
        sizes[cdiv(queue_size, size)] = size
    time = {splits: cdiv(row_blocks * splits, slots) * size for splits, size in sizes.items()}
    fastest = min(time.values())
    splits = min(n for n, t in time.items() if t * 0.95 <= fastest)
    return sizes[splits], splits


def queue_pass_grid(rows: int, block_m: int, num_splits: int) -> tuple[int]:
    """The grid of the queue-pass and repair kernels: one dimension of row_blocks x
    num_splits programs (kernels._block: program = split * row_blocks + row block).
    Splits on a second grid dimension would be capped at 65,535 by CUDA, and an
    explicit split plan (e.g. split_size=128 with K = 10^7: 78,125 splits) needs more.
    Raises ValueError past CUDA's cap of 2^31 - 1 programs on dimension 0."""
    programs = cdiv(rows, block_m) * num_splits
    if programs > MAX_GRID_PROGRAMS:
        raise ValueError(
            f"the queue pass needs {cdiv(rows, block_m)} row blocks x {num_splits} splits = {programs} programs, "
            f"more than CUDA's grid limit of 2^31 - 1 = {MAX_GRID_PROGRAMS}; use a larger split_size")
    return (programs,)


def padded_rows(rows: int) -> int:
    """The row count the queue-pass and repair kernels are launched with: ``rows``
    rounded up to a multiple of ROW_ALIGN (padding rows: zero embeddings, label -1,
    exactly what the kernels' masked loads read past the last row)."""
    return cdiv(rows, ROW_ALIGN) * ROW_ALIGN


def _pad_rows(tensor: torch.Tensor, rows: int, value) -> torch.Tensor:
    """``tensor`` (contiguous, rows first) with rows appended up to ``rows``, filled with ``value``."""
    if tensor.shape[0] == rows:
        return tensor
    padded = tensor.new_full((rows, *tensor.shape[1:]), value)
    padded[:tensor.shape[0]] = tensor
    return padded


def repair_tile(tile: TileConfig, fma: bool = False) -> TileConfig:
    """The repair kernel's configuration on a GPU after a queue pass run with ``tile``.
    The repair holds the queue tile in registers (its non-finite values zeroed for the
    second GEMM), which spills at the queue pass's own tiles (sm_90's 64 x 64: 468 B
    under Triton 3.8, 830 B under 3.6; sm_86's 16 x 32 at 4 warps too) and, under
    Triton 3.6, even at 32 x 32 on 8 warps; it runs only when the queue holds a
    non-finite value. At most 16 x 32 at 8 warps, one stage; with ``fma`` (exact fp32
    products on the FMA units, twice the bytes a tile) 16 x 16 at 16 warps. It
    recomputes whole rows of a split, so its tiles need not be the queue pass's
    (benchmarks/compiled.py compiles each without a spill under Triton 3.6 and 3.8)."""
    if fma:
        return TileConfig(min(tile.block_m, 16), min(tile.block_k, 16), num_warps=16, num_stages=1)
    return TileConfig(min(tile.block_m, 16), min(tile.block_k, 32), num_warps=8, num_stages=1)


def merge_blocks(rows: int, num_splits: int, block_d: int, programs: int) -> tuple[int, int]:
    """(BLOCK_R, BLOCK_S) of the merge kernel: rows per program so that about
    `programs` programs run, then as many splits per tile as fit _MERGE_TILE."""
    block_r = 1
    while block_r * 2 * programs <= rows and block_r * 2 * block_d * 2 <= _MERGE_TILE:
        block_r *= 2
    block_s = 2  # tl.arange needs at least 2 elements on every Triton version
    while block_s < num_splits and block_r * block_s * 2 * block_d <= _MERGE_TILE:
        block_s *= 2
    return block_r, block_s


def _merge_programs(device: torch.device) -> int:
    if device.type == "cuda":
        return 2 * device_architecture(_device_index(device))[1]
    return 1  # the interpreter runs programs one after the other: as few as possible


_AUTOTUNED: dict = {}


def _autotuned_kernel(block_m: int, configs: tuple[TileConfig, ...]):
    """The queue-pass kernel behind an autotuner over the configurations that fit (one per BLOCK_M)."""
    key = (block_m, configs)
    if key not in _AUTOTUNED:
        _AUTOTUNED[key] = triton.autotune(
            configs=[triton.Config({"BLOCK_K": c.block_k}, num_warps=c.num_warps, num_stages=c.num_stages)
                     for c in configs],
            key=["dim", "row_bucket", "split_bucket", "COMPUTE_GRAD", "FILTER"],
        )(queue_pass_kernel)
    return _AUTOTUNED[key]


def autotuner_picks() -> dict:
    """The configuration the autotuner chose for each autotuned kernel so far (keyed as the
    cache of autotuned kernels: BLOCK_M first), for reports such as scripts/gpu_check.sh."""
    return {key: kernel.best_config for key, kernel in _AUTOTUNED.items()}


def _autotune_enabled() -> bool:
    # DCQ_TRITON_AUTOTUNE=0 uses the first configuration (fast start, e.g. tests).
    return os.environ.get("DCQ_TRITON_AUTOTUNE", "1") != "0"


def _tile_plan(q_gemm: torch.Tensor, config: dict | None) -> tuple[TileConfig, tuple[TileConfig, ...]]:
    """(the configuration, the candidates of the autotuner or () for none)."""
    if config is not None:
        return TileConfig(config["BLOCK_M"], config["BLOCK_K"], config["num_warps"], config["num_stages"]), ()
    if INTERPRETED:
        return _INTERPRETER_CONFIG, ()
    architecture, _ = device_architecture(_device_index(q_gemm.device))
    candidates = tuple(tile_configs(architecture, q_gemm.element_size(), q_gemm.shape[1],
                                    tf32=input_precision(q_gemm.dtype) == "tf32"))
    return candidates[0], (candidates if _autotune_enabled() else ())


def _split_plan(rows: int, queue_size: int, dim: int, config: TileConfig, compute_grad: bool,
                device: torch.device, split_size: int | None) -> tuple[int, int]:
    """(split_size, num_splits): the given split size, else plan_splits for the device
    (for the padded rows, whose workspace the kernels write)."""
    rows = padded_rows(rows)
    if split_size is not None:
        split_size = int(split_size)
        if split_size <= 0:
            raise ValueError(f"split_size must be positive, got {split_size}")
        return split_size, max(1, cdiv(queue_size, split_size))
    if device.type == "cuda":
        _, multiprocessors = device_architecture(_device_index(device))
        return plan_splits(rows, queue_size, dim, config.block_m, compute_grad, multiprocessors)
    return plan_splits(rows, queue_size, dim, config.block_m, compute_grad, _INTERPRETER_SLOTS,
                       align=config.block_k, min_split=config.block_k)


class LaunchPlan(NamedTuple):
    """What ``queue_pass`` launches for a call, without launching it (the first-contact check
    keys on it, dcq_ops.first_contact): the tile configuration (the autotuner's candidates
    share BLOCK_M; their BLOCK_K divides ``align``), the split of the queue, the row and
    queue tails (rows of the last row block; entries of the last split past its last full
    ``align``), the autotuner's row and split buckets, and the sm_90 kernel asked for
    (``DCQ_OPS_SM90_KERNEL``: another kernel is another launch, so another class)."""

    block_m: int
    block_k: int
    autotuned: bool
    split_size: int
    num_splits: int
    align: int
    last_row_block: int
    queue_tail: int
    row_bucket: int
    split_bucket: int
    sm90_kernel: str


@functools.lru_cache(maxsize=1024)
def _launch_plan(rows, queue_size, dim, gemm_dtype, compute_grad, device, precision, autotune,
                 sm90_kernel) -> LaunchPlan:
    if INTERPRETED or device.type != "cuda":
        tile, candidates = _INTERPRETER_CONFIG, ()
    else:
        architecture, _ = device_architecture(_device_index(device))
        options = tuple(tile_configs(architecture, gemm_dtype.itemsize, dim, tf32=precision == "tf32"))
        tile, candidates = options[0], (options if autotune else ())
    split_size, num_splits = _split_plan(rows, queue_size, dim, tile, compute_grad, device, None)
    align = SPLIT_ALIGN if candidates or device.type == "cuda" else tile.block_k
    last_split = queue_size - (num_splits - 1) * split_size
    return LaunchPlan(tile.block_m, tile.block_k, bool(candidates), split_size, num_splits, align,
                      rows - (cdiv(rows, tile.block_m) - 1) * tile.block_m if rows else 0, last_split % align,
                      max(16, 1 << max(0, rows - 1).bit_length()), 1 << max(0, split_size - 1).bit_length(),
                      sm90_kernel)


def launch_plan(rows: int, queue_size: int, dim: int, gemm_dtype: torch.dtype, compute_grad: bool,
                device: torch.device) -> LaunchPlan:
    """The launch plan of ``queue_pass`` for a call of these shapes with the automatic choice
    (no ``split_size`` or ``config`` override); read-only, nothing is launched."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return _launch_plan(int(rows), int(queue_size), int(dim), gemm_dtype, bool(compute_grad), device,
                        input_precision(gemm_dtype), _autotune_enabled(), hopper_launch.selected_kernel())


# ----------------------------------------------------------------------------
# Launches


class Workspace(NamedTuple):
    """The partials of every row in every split (fp32): maxima [N, S] in log2 units,
    sums [N, S], accumulators [N, S, D] (with compute_grad; else a placeholder)."""

    max_ws: torch.Tensor
    sum_ws: torch.Tensor
    acc_ws: torch.Tensor
    dim: int
    compute_grad: bool

    @property
    def num_splits(self) -> int:
        return self.max_ws.shape[1]


class FinalizeInputs(NamedTuple):
    """What finalize needs of each row besides its partials (contiguous), in the
    order of the merge kernel's pointers: the positive's logit z_pos [N] and its
    slope dz_pos/dc [N], the normalised embeddings q [N, D] and class weights w
    [N, D] (fp32), and 1 / max(||x||, 1e-12) [N] in float64, negated below 1e-12
    (dcq_ops.triton.ops._normalised)."""

    pos_logit: torch.Tensor
    pos_slope: torch.Tensor
    q: torch.Tensor
    w: torch.Tensor
    inv_norm: torch.Tensor


def queue_pass(q_gemm, labels, queue_weights, queue_labels, scale, interclass_filtering_threshold,
               compute_grad, *, split_size=None, config=None) -> Workspace:
    """The partials of rows ``q_gemm`` (normalised, in the GEMMs' dtype) over every
    split of the queue. ``split_size`` (queue entries per split) and ``config``
    (dict with BLOCK_M, BLOCK_K, num_warps, num_stages) override the automatic choice."""
    rows, dim = q_gemm.shape
    queue_size = queue_weights.shape[0]
    device = q_gemm.device
    compute_grad = bool(compute_grad)
    tile, candidates = _tile_plan(q_gemm, config)
    split_size, num_splits = _split_plan(rows, queue_size, dim, tile, compute_grad, device, split_size)
    # The kernels' row blocks are those of the padded rows (the same as of the rows when
    # BLOCK_M is a multiple of ROW_ALIGN, as every configuration's is).
    padded = padded_rows(rows)
    grid = queue_pass_grid(padded, tile.block_m, num_splits)  # checked before the workspace is allocated
    # The interpreter's repair keeps the queue pass's tiles (and so its results bit for bit).
    repair = tile if INTERPRETED else repair_tile(tile, fma=input_precision(q_gemm.dtype) == "ieee")
    repair_grid = queue_pass_grid(padded, repair.block_m, num_splits) if compute_grad else None
    # The workspace holds the padded rows too (the kernels write them); the views hold the rows.
    f32 = dict(dtype=torch.float32, device=device)
    max_ws, sum_ws = torch.empty((padded, num_splits), **f32), torch.empty((padded, num_splits), **f32)
    acc_ws = torch.empty((padded, num_splits, dim), **f32)[:rows] if compute_grad else torch.empty((1,), **f32)
    workspace = Workspace(max_ws[:rows], sum_ws[:rows], acc_ws, dim, compute_grad)
    if rows == 0:
        return workspace
    if padded > rows:
        sum_ws[rows:] = float("nan")  # so that the repair never marks a padding row the pipelined kernel skips
    threshold = float(interclass_filtering_threshold)
    q_gemm, labels = q_gemm.contiguous(), labels.contiguous()
    args = (_pad_rows(q_gemm, padded, 0.0), _pad_rows(labels, padded, -1), queue_weights.contiguous(),
            queue_labels.contiguous(), *workspace[:3], padded, queue_size, dim, num_splits, split_size,
            float(scale) * LOG2E,  # logits in log2 units: exp2 is the hardware's exponential
            threshold, CHAIN_BREAK)
    buckets = (max(16, 1 << max(0, rows - 1).bit_length()), 1 << max(0, split_size - 1).bit_length())
    flags = dict(FILTER=threshold > 0, INPUT_PRECISION=input_precision(q_gemm.dtype), BLOCK_M=tile.block_m,
                 BLOCK_D=block_d_of(dim))
    with _device_context(device):
        capability = device_architecture(_device_index(device))[0].capability if device.type == "cuda" else None
        sm90 = hopper_launch.choose_kernel(q_gemm, args[2], split_size, tile.block_m, tile.block_k, config,
                                           capability, compute_grad=compute_grad, filtering=threshold > 0)
        if sm90:
            # The sm_90 default's kernel that applies and whose probe cleared the class:
            # dcq_ops.triton.hopper_launch (the rows as given: its tensor descriptors need no padding).
            hopper_launch.launch(grid, q_gemm, labels, *args[2:4], workspace, rows, *args[8:14], compute_grad,
                                 tile.block_m, tile.block_k, flags["INPUT_PRECISION"], kernel=sm90)
        elif candidates:
            same_rows = tuple(c for c in candidates if c.block_m == tile.block_m)
            _autotuned_kernel(tile.block_m, same_rows)[grid](*args, *buckets, **flags, COMPUTE_GRAD=compute_grad)
        else:
            queue_pass_kernel[grid](*args, *buckets, **flags, COMPUTE_GRAD=compute_grad, BLOCK_K=tile.block_k,
                                    num_warps=tile.num_warps, num_stages=tile.num_stages)
        if compute_grad:  # a no-op unless the queue holds a non-finite value (see queue_pass_kernel)
            repair_kernel[repair_grid](*args, **dict(flags, BLOCK_M=repair.block_m), BLOCK_K=repair.block_k,
                                       num_warps=repair.num_warps, num_stages=repair.num_stages)
    return workspace


def workspace_of_partials(row_max, row_sum, accumulator, compute_grad) -> Workspace:
    """Merged partials (natural-log units; the accumulator [N, D] used with
    compute_grad) as a workspace of one split, for finalize."""
    rows, dim = row_max.shape[0], accumulator.shape[-1]
    max_ws = (row_max.float() * LOG2E).reshape(rows, 1).contiguous()
    acc_ws = accumulator.float().reshape(rows, 1, dim).contiguous() if compute_grad else max_ws
    return Workspace(max_ws, row_sum.float().reshape(rows, 1).contiguous(), acc_ws, dim, bool(compute_grad))


def _launch_merge(workspace: Workspace, merged, finalize_inputs, loss, grad, scale: float) -> None:
    """The merge kernel over the workspace's rows, writing the merged partials
    ``merged`` (finalize_inputs None) or the loss and gradient rows."""
    rows = workspace.max_ws.shape[0]
    if rows == 0:
        return
    device = workspace.max_ws.device
    # The tile as with the gradient, also without: the same order of the sums, the same loss.
    block_d = block_d_of(workspace.dim)
    block_r, block_s = merge_blocks(rows, workspace.num_splits, block_d, programs=_merge_programs(device))
    unused = workspace.max_ws  # pointers of the other mode
    with _device_context(device):
        merge_kernel[(cdiv(rows, block_r),)](
            *workspace[:3], *(merged or (unused,) * 3), *(finalize_inputs or (unused,) * 5), loss, grad,
            rows, workspace.dim, workspace.num_splits, float(scale),
            FINALIZE=finalize_inputs is not None, COMPUTE_GRAD=workspace.compute_grad,
            BLOCK_R=block_r, BLOCK_S=block_s, BLOCK_D=block_d, num_warps=4,
        )


def _rows_and_gradient_rows(workspace: Workspace):
    """Two fp32 outputs: one number a row [N], and one row [N, D] each or [0, D]
    without compute_grad."""
    rows = workspace.max_ws.shape[0]
    f32 = dict(dtype=torch.float32, device=workspace.max_ws.device)
    return torch.empty(rows, **f32), torch.empty((rows if workspace.compute_grad else 0, workspace.dim), **f32)


def merge(workspace: Workspace):
    """The loss algebra's partials of every row, its splits merged: (row_max [N] in
    natural-log units, -inf where nothing was kept; row_sum [N]; accumulator [N, D]
    or [0, D]), fp32."""
    row_max, accumulator = _rows_and_gradient_rows(workspace)
    row_sum = torch.empty_like(row_max)
    _launch_merge(workspace, (row_max, row_sum, accumulator), None, row_max, row_max, 0.0)
    return row_max, row_sum, accumulator


def finalize(workspace: Workspace, finalize_inputs: FinalizeInputs, scale: float):
    """(loss rows [N], gradient rows [N, D] or [0, D]), fp32, from the workspace's
    partials (merged in the same kernel)."""
    loss, grad = _rows_and_gradient_rows(workspace)
    _launch_merge(workspace, None, finalize_inputs, loss, grad, scale)
    return loss, grad
