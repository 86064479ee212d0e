"""Fused Triton backend of the DCQ loss (docs/loss.md), as the loss algebra:

- partials: for a block of rows and a split of the queue, one pass over the
  split's tiles, as flash attention gives softmax(QK^T)V:

      cos  = q @ W_tile^T                       (tl.dot, fp32 accumulation)
      z    = s * cos, masked (excluded -> -inf), filtered (-> 0, no gradient)
      m    = running max of z,  l = running sum of exp(z - m)
      acc  = acc * exp(m_old - m) + exp(z - m) @ W_tile

  so the logits live in registers only and forward + backward cost the two
  GEMMs (4 N K D FLOPs). The queue is split across programs so that a small
  batch still fills the GPU; each (row block, split) program writes its
  partial (m, l, acc) to a workspace;
- merge: a second small kernel combines the splits of each row (a max, then
  the rescaled sums);
- finalize: in the same kernel, the loss and the gradient of each row
  (_finalize_rows: softplus(lse_neg - z_pos), the positive's factor as the
  negatives' probability sigmoid(lse_neg - z_pos), never 1 - p_pos, and the
  projection through the normalisation of x).

``margin_cross_entropy_triton`` is the three in one call; ``partials`` and
``finalize`` are exposed apart for the sharded queue (dcq_ops.parallel), which
merges the partials of every rank with collectives in between.

Both GEMMs take their operands in the queue's dtype (bf16 by default on a
GPU: the tensor cores), accumulate in fp32, and everything after them is fp32.
The O(N D) prologue (normalisation, positive cosine, margin of the positive and
its derivative) is plain PyTorch on dcq_ops.margin's functions, which every
backend shares. The gradient is produced in the forward, so the backward only
scales it and never reads the queue (docs/loss.md, "The queue and the backward").
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch
import triton
import triton.language as tl

from dcq_ops.margin import margin_derivative, margin_value
from dcq_ops.ops.fused_autograd import fused_fake, register_fused_autograd
from dcq_ops.triton.configs import ARCHITECTURES, TileConfig, architecture_of, block_d_of, tile_configs

# Whether the kernels below were decorated for Triton's CPU interpreter. Triton
# reads TRITON_INTERPRET when @triton.jit runs, i.e. when this module is first
# imported; later changes of the variable do not change what these kernels are.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"

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

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


@triton.jit
def _log1p(u):
    """log(1 + u) for u >= 0, accurate also when 1 + u rounds to 1.

    Core tl has no log1p. With w = fl(1 + u), log(w) * u / (w - 1) cancels the
    rounding of w (Goldberg, "What every computer scientist should know about
    floating-point arithmetic", 1991); where w == 1, log1p(u) = u to working precision.
    """
    w = 1.0 + u
    return tl.where(w == 1.0, u, tl.log(w) * (u / tl.where(w == 1.0, 1.0, w - 1.0)))


@triton.jit
def _queue_pass_kernel(
    q_ptr, labels_ptr, w_ptr, queue_labels_ptr,
    max_ws_ptr, sum_ws_ptr, acc_ws_ptr,
    num_rows, queue_size, dim, num_splits, split_size,
    scale_log2, filter_threshold,
    row_bucket, split_bucket,  # autotuning keys only
    FILTER: tl.constexpr, WITH_ACC: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Rows [pid_m*BLOCK_M, +BLOCK_M) against queue entries of split pid_s.

    Writes, per row, the max m (in log2 units) of the kept logits of the split,
    sum_j exp2(z_j - m), and (WITH_ACC) sum_j exp2(z_j - m) * W_j over the
    entries that carry a gradient (kept and not filtered).
    """
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < num_rows
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < dim  # D need not be a power of two: padded columns are 0

    q = tl.load(q_ptr + rows[:, None].to(tl.int64) * dim + cols[None, :],
                mask=row_ok[:, None] & col_ok[None, :], other=0.0)
    # Padded rows get label -1; they are never stored.
    labels = tl.load(labels_ptr + rows, mask=row_ok, other=-1)

    # Logits in log2 units (z * log2(e)): exp2 is the hardware's exponential.
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    k_begin = pid_s * split_size
    k_end = tl.minimum(k_begin + split_size, queue_size)
    for k0 in range(k_begin, k_end, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < k_end
        w = tl.load(w_ptr + ks[:, None].to(tl.int64) * dim + cols[None, :],
                    mask=k_ok[:, None] & col_ok[None, :], other=0.0).to(q.dtype)
        # Out-of-range slots read as empty (-1), hence excluded.
        queue_labels = tl.load(queue_labels_ptr + ks, mask=k_ok, other=-1)

        cos = tl.dot(q, tl.trans(w), input_precision=INPUT_PRECISION)  # [BLOCK_M, BLOCK_K], fp32
        keep = (queue_labels[None, :] >= 0) & (queue_labels[None, :] != labels[:, None])
        z = cos * scale_log2
        if FILTER:
            # Inter-class filtering: a too-similar negative keeps logit 0 in the
            # sum but gets no gradient (masked below).
            filtered = cos > filter_threshold
            z = tl.where(filtered, 0.0, z)
        z = tl.where(keep, z, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(z, axis=1))
        # A row with no kept entry so far has m_new = -inf; measuring from 0
        # instead gives exp2(-inf) = 0 rather than exp2(-inf - -inf) = NaN
        # (and its l_i, acc are still 0, so alpha does not matter).
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_ref)
        p = tl.exp2(z - m_ref[:, None])  # excluded entries: exp2(-inf) = 0
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if WITH_ACC:
            if FILTER:
                p = tl.where(filtered, 0.0, p)
            # p in [0, 1] goes to the GEMM in the compute dtype, as in the
            # chunked backend; the product accumulates in fp32.
            acc = tl.dot(p.to(w.dtype), w, acc * alpha[:, None], input_precision=INPUT_PRECISION)
        m_i = m_new

    ws = rows.to(tl.int64) * num_splits + pid_s  # workspace layout [N, S(, D)]
    tl.store(max_ws_ptr + ws, m_i, mask=row_ok)
    tl.store(sum_ws_ptr + ws, l_i, mask=row_ok)
    if WITH_ACC:
        tl.store(acc_ws_ptr + ws[:, None] * dim + cols[None, :], acc,
                 mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _finalize_rows(rows, row_ok, m_nat, row_sum, acc, cols, col_ok,
                   pos_logit_ptr, pos_slope_ptr, q_ptr, w_ptr, inv_norm_ptr, loss_ptr, grad_ptr,
                   dim, scale, COMPUTE_GRAD: tl.constexpr):
    """The loss and the gradient of rows from their merged partials (natural-log
    units). A row with every queue entry excluded (row_sum = 0) has loss 0 and
    gradient 0, with harmless stand-ins so nothing is NaN."""
    has_negative = row_sum > 0.0
    z_pos = tl.load(pos_logit_ptr + rows, mask=row_ok, other=0.0)
    lse_neg = m_nat + tl.log(tl.where(has_negative, row_sum, 1.0))
    d = lse_neg - z_pos
    e = tl.exp(-tl.abs(d))
    log1p_e = _log1p(e)
    loss = tl.maximum(d, 0.0) + log1p_e  # softplus(d), exact for confident rows (d << 0)
    tl.store(loss_ptr + rows, tl.where(has_negative, loss, 0.0), mask=row_ok)
    if COMPUTE_GRAD:
        # 1 - p_pos as the negatives' total probability sigmoid(d).
        sigmoid_d = tl.where(d >= 0.0, 1.0 / (1.0 + e), e / (1.0 + e))
        coef_pos = -sigmoid_d * tl.load(pos_slope_ptr + rows, mask=row_ok, other=0.0)
        # p_ij = exp(z_ij - m) * exp(m - lse_all), and dz_ij/dc_ij = s.
        lse_all = tl.maximum(z_pos, lse_neg) + log1p_e
        coef_neg = scale * tl.exp(m_nat - lse_all)
        coef_pos = tl.where(has_negative, coef_pos, 0.0)
        coef_neg = tl.where(has_negative, coef_neg, 0.0)
        offs = rows[:, None].to(tl.int64) * dim + cols[None, :]
        mask = row_ok[:, None] & col_ok[None, :]
        q = tl.load(q_ptr + offs, mask=mask, other=0.0)
        w = tl.load(w_ptr + offs, mask=mask, other=0.0)
        grad_q = coef_pos[:, None] * w + coef_neg[:, None] * acc
        # Through q = x / ||x||: (I - q q^T) grad_q / ||x||.
        projection = tl.sum(q * grad_q, axis=1)
        inv_norm = tl.load(inv_norm_ptr + rows, mask=row_ok, other=0.0)
        grad_x = (grad_q - q * projection[:, None]) * inv_norm[:, None]
        tl.store(grad_ptr + offs, grad_x, mask=mask)


@triton.jit
def _merge_kernel(
    max_ws_ptr, sum_ws_ptr, acc_ws_ptr,
    out_max_ptr, out_sum_ptr, out_acc_ptr,
    pos_logit_ptr, pos_slope_ptr, q_ptr, w_ptr, inv_norm_ptr, loss_ptr, grad_ptr,
    num_rows, dim, num_splits, scale,
    FINALIZE: tl.constexpr, WITH_ACC: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Rows [pid*BLOCK_R, +BLOCK_R): merge their splits' (m, l, acc) (m in log2
    units), then either finalise the rows (FINALIZE) or write the merged
    partials in natural-log units (the loss algebra's partials of the whole
    queue or shard). Splits are read BLOCK_S at a time ([BLOCK_R, BLOCK_S,
    BLOCK_D] tiles), so that many loads are in flight even for a small batch
    split many ways."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < num_rows
    splits = tl.arange(0, BLOCK_S)
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < dim
    ws_rows = rows.to(tl.int64) * num_splits  # workspace layout [N, S(, D)]

    m_tile = tl.full([BLOCK_R, BLOCK_S], float("-inf"), tl.float32)
    for s0 in range(0, num_splits, BLOCK_S):
        ok = row_ok[:, None] & (s0 + splits < num_splits)[None, :]
        m_split = tl.load(max_ws_ptr + ws_rows[:, None] + s0 + splits[None, :], mask=ok, other=float("-inf"))
        m_tile = tl.maximum(m_tile, m_split)
    m_row = tl.max(m_tile, axis=1)
    m_ref = tl.where(m_row == float("-inf"), 0.0, m_row)  # nothing kept anywhere: l, acc are 0

    l_tile = tl.zeros([BLOCK_R, BLOCK_S], dtype=tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    for s0 in range(0, num_splits, BLOCK_S):
        ok = row_ok[:, None] & (s0 + splits < num_splits)[None, :]
        ws = ws_rows[:, None] + s0 + splits[None, :]
        m_split = tl.load(max_ws_ptr + ws, mask=ok, other=float("-inf"))
        alpha = tl.exp2(m_split - m_ref[:, None])  # 0 for a split that kept nothing
        l_tile += alpha * tl.load(sum_ws_ptr + ws, mask=ok, other=0.0)
        if WITH_ACC:
            part = tl.load(acc_ws_ptr + ws[:, :, None] * dim + cols[None, None, :],
                           mask=ok[:, :, None] & col_ok[None, None, :], other=0.0)
            acc += tl.sum(alpha[:, :, None] * part, axis=1)
    row_sum = tl.sum(l_tile, axis=1)

    if FINALIZE:
        _finalize_rows(rows, row_ok, m_ref * 0.6931471805599453, row_sum, acc, cols, col_ok,
                       pos_logit_ptr, pos_slope_ptr, q_ptr, w_ptr, inv_norm_ptr, loss_ptr, grad_ptr,
                       dim, scale, WITH_ACC)
    else:
        tl.store(out_max_ptr + rows, m_row * 0.6931471805599453, mask=row_ok)  # -inf stays -inf
        tl.store(out_sum_ptr + rows, row_sum, mask=row_ok)
        if WITH_ACC:
            offs = rows[:, None].to(tl.int64) * dim + cols[None, :]
            tl.store(out_acc_ptr + offs, acc, mask=row_ok[:, None] & col_ok[None, :])


# ----------------------------------------------------------------------------
# Launch configuration


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def gemm_dtype_of(queue_dtype: torch.dtype) -> torch.dtype:
    """Both GEMMs take their operands in the queue's dtype (docs/loss.md, "Numerics")."""
    if queue_dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"the triton backend multiplies in float32, float16 or bfloat16 (the queue's dtype), got a "
                        f"{queue_dtype} queue; float64 runs on the 'chunked' or 'reference' backend")
    return queue_dtype


@functools.lru_cache(maxsize=None)
def _device_architecture(device_index: int):
    props = torch.cuda.get_device_properties(device_index)
    optin = getattr(props, "shared_memory_per_block_optin", None) or ARCHITECTURES["sm_86"].shared_memory_per_block_optin
    return architecture_of((props.major, props.minor), optin), props.multi_processor_count


@functools.lru_cache(maxsize=256)
def plan_splits(rows: int, queue_size: int, dim: int, block_m: int, with_accumulator: bool,
                slots: int, align: int = SPLIT_ALIGN, min_split: int = MIN_SPLIT_SIZE) -> tuple[int, int]:
    """(split_size, num_splits) of the queue for `slots` programs running at once.

    The main kernel runs one program per multiprocessor at a time (its
    accumulator and tiles take most of the registers and shared memory), so
    its time goes as waves x work per program = ceil(row_blocks*S / slots) * K/S.
    The plan takes the fewest splits within 5% of the fastest (more splits
    cost workspace and merging), with split sizes a multiple of align, at
    least min_split entries per split, and the workspace under
    WORKSPACE_LIMIT_BYTES. A batch of 128 rows (2 row blocks) is thus split
    about slots/2 ways and fills every multiprocessor.
    """
    if queue_size == 0:
        return 1, 1  # one program per row block, which sees no entry: loss 0
    row_blocks = _cdiv(rows, block_m)
    bytes_per_split = rows * 4 * (2 + (dim if with_accumulator else 0))
    max_splits = max(1, min(queue_size // min_split, WORKSPACE_LIMIT_BYTES // bytes_per_split))
    sizes = {}  # number of splits -> split size (a multiple of align)
    for splits in range(1, max_splits + 1):
        size = _cdiv(_cdiv(queue_size, splits), align) * align
        sizes[_cdiv(queue_size, size)] = size
    time = {splits: _cdiv(row_blocks * splits, slots) * size for splits, size in sizes.items()}
    fastest = min(time.values())
    splits = min(n for n, t in time.items() if t * 0.95 <= fastest)
    return sizes[splits], splits


# Elements of the merge kernel's [BLOCK_R, BLOCK_S, BLOCK_D] tile (32 fp32
# registers a thread at 4 warps).
_MERGE_TILE = 4096


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


_AUTOTUNED: dict = {}


def _autotuned_kernel(block_m: int, configs: tuple[TileConfig, ...]):
    """The queue-pass kernel behind an autotuner over the configurations that fit (one per BLOCK_M)."""
    key = (block_m, configs)
    if key not in _AUTOTUNED:
        _AUTOTUNED[key] = triton.autotune(
            configs=[triton.Config({"BLOCK_K": c.block_k}, num_warps=c.num_warps, num_stages=c.num_stages)
                     for c in configs],
            key=["dim", "row_bucket", "split_bucket", "WITH_ACC", "FILTER"],
        )(_queue_pass_kernel)
    return _AUTOTUNED[key]


def _autotune_enabled() -> bool:
    # DCQ_TRITON_AUTOTUNE=0 uses the first configuration (fast start, e.g. tests).
    return os.environ.get("DCQ_TRITON_AUTOTUNE", "1") != "0"


def _input_precision(dtype: torch.dtype):
    """fp32 GEMMs honour torch's TF32 setting (exact "ieee" only when the float32
    matmul precision is "highest", as torch.mm); 16-bit operands multiply exactly anyway."""
    if dtype != torch.float32:
        return None
    return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def _device_context(device: torch.device):
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _check_device(device: torch.device) -> None:
    if device.type != "cuda" and not INTERPRETED:
        raise RuntimeError(
            f"the triton backend runs on CUDA tensors, got tensors on {device}; for CPU tensors set "
            "TRITON_INTERPRET=1 before dcq_ops.triton.margin_ce is first imported (Triton's interpreter)"
        )


def _normalised(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x / ||x||, ||x||) in fp32."""
    x = x.float()
    norm = x.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return (x / norm).contiguous(), norm


# ----------------------------------------------------------------------------
# The loss algebra


def _queue_pass(q_gemm, labels, queue_weights, queue_labels, scale, filter_threshold, with_accumulator,
                split_size=None, config=None):
    """The partials of every row over every split of the queue: (max_ws [N, S]
    in log2 units, sum_ws [N, S], acc_ws [N, S, D] or a dummy, S)."""
    rows, dim = q_gemm.shape
    queue_size = queue_weights.shape[0]
    device = q_gemm.device
    f32 = dict(dtype=torch.float32, device=device)
    element_size = q_gemm.element_size()
    autotune = False
    candidates = ()
    if config is not None:
        config = TileConfig(config["BLOCK_M"], config["BLOCK_K"], config["num_warps"], config["num_stages"])
    elif INTERPRETED:
        config = _INTERPRETER_CONFIG
    else:
        architecture, _ = _device_architecture(_device_index(device))
        candidates = tuple(tile_configs(architecture, element_size, dim,
                                        tf32=_input_precision(q_gemm.dtype) == "tf32"))
        config = candidates[0]
        autotune = _autotune_enabled()
    block_m = config.block_m

    if split_size is None:
        if device.type == "cuda":
            _, multiprocessors = _device_architecture(_device_index(device))
            split_size, num_splits = plan_splits(rows, queue_size, dim, block_m, bool(with_accumulator),
                                                 multiprocessors)
        else:
            split_size, num_splits = plan_splits(rows, queue_size, dim, block_m, bool(with_accumulator),
                                                 _INTERPRETER_SLOTS, align=config.block_k, min_split=config.block_k)
    else:
        split_size = int(split_size)
        if split_size <= 0:
            raise ValueError(f"split_size must be positive, got {split_size}")
        num_splits = max(1, _cdiv(queue_size, split_size))

    max_ws = torch.empty((rows, num_splits), **f32)
    sum_ws = torch.empty((rows, num_splits), **f32)
    acc_ws = torch.empty((rows, num_splits, dim) if with_accumulator else (1,), **f32)
    threshold = float(filter_threshold)
    args = (q_gemm, labels, queue_weights, queue_labels, max_ws, sum_ws, acc_ws,
            rows, queue_size, dim, num_splits, split_size,
            float(scale) * LOG2E,  # logits in log2 units: exp2 is the hardware's exponential
            threshold,
            max(16, 1 << max(0, rows - 1).bit_length()), 1 << max(0, split_size - 1).bit_length())
    flags = dict(FILTER=threshold > 0, WITH_ACC=bool(with_accumulator),
                 INPUT_PRECISION=_input_precision(q_gemm.dtype), BLOCK_M=block_m, BLOCK_D=block_d_of(dim))
    grid = (_cdiv(rows, block_m), num_splits)
    with _device_context(device):
        if autotune:
            same_rows = tuple(c for c in candidates if c.block_m == block_m)
            _autotuned_kernel(block_m, same_rows)[grid](*args, **flags)
        else:
            _queue_pass_kernel[grid](*args, **flags, BLOCK_K=config.block_k, num_warps=config.num_warps,
                                     num_stages=config.num_stages)
    return max_ws, sum_ws, acc_ws, num_splits


def _merge_programs(device: torch.device) -> int:
    if device.type == "cuda":
        return 2 * _device_architecture(_device_index(device))[1]
    return 1  # the interpreter runs programs one after the other: as few as possible


def _device_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def _positive(q, w, scale, m1, m2, m3, straight_through):
    """(z_pos, dz_pos/dc) of each row, fp32, with dcq_ops.margin's functions."""
    positive_cos = (q * w).sum(dim=1)
    logit = (scale * margin_value(positive_cos, m1, m2, m3)).contiguous()
    if straight_through:
        slope = torch.full_like(positive_cos, scale)
    else:
        slope = (scale * margin_derivative(positive_cos, m1, m2)).contiguous()
    return logit, slope


def _merge(max_ws, sum_ws, acc_ws, num_splits, *, with_accumulator, finalize_inputs=None, scale=0.0):
    """Launch the merge kernel: merged partials (natural units), or, with
    ``finalize_inputs`` = (pos_logit, pos_slope, q, w, inv_norm, compute_grad),
    the loss and gradient rows."""
    rows = max_ws.shape[0]
    dim = acc_ws.shape[-1] if with_accumulator else (finalize_inputs[2].shape[1] if finalize_inputs else 1)
    device = max_ws.device
    f32 = dict(dtype=torch.float32, device=device)
    block_d = block_d_of(dim)
    block_r, block_s = merge_blocks(rows, num_splits, block_d, programs=_merge_programs(device))
    if finalize_inputs is None:
        out_max, out_sum = torch.empty(rows, **f32), torch.empty(rows, **f32)
        out_acc = torch.empty((rows, dim) if with_accumulator else (0, dim), **f32)
        finals = (out_max,) * 8  # unused pointers
        loss = grad = out_max
    else:
        out_max = out_sum = out_acc = max_ws
        pos_logit, pos_slope, q, w, inv_norm, compute_grad = finalize_inputs
        loss = torch.empty(rows, **f32)
        grad = torch.empty((rows if compute_grad else 0, dim), **f32)
        finals = (pos_logit, pos_slope, q, w, inv_norm)
    if rows == 0:
        return (out_max, out_sum, out_acc) if finalize_inputs is None else (loss, grad)
    with _device_context(device):
        _merge_kernel[(_cdiv(rows, block_r),)](
            max_ws, sum_ws, acc_ws, out_max, out_sum, out_acc, *finals[:5], loss, grad,
            rows, dim, num_splits, float(scale),
            FINALIZE=finalize_inputs is not None, WITH_ACC=bool(with_accumulator),
            BLOCK_R=block_r, BLOCK_S=block_s, BLOCK_D=block_d, num_warps=4,
        )
    return (out_max, out_sum, out_acc) if finalize_inputs is None else (loss, grad)


def partials(embeddings, labels, queue_weights, queue_labels, scale, filter_threshold, with_accumulator):
    """The loss algebra's partials of every row over this queue (or shard):
    (row_max [N] in natural-log units, -inf where nothing was kept; row_sum [N];
    accumulator [N, D] or [0, D]), fp32."""
    _check_device(embeddings.device)
    gemm_dtype = gemm_dtype_of(queue_weights.dtype)
    q, _ = _normalised(embeddings)
    max_ws, sum_ws, acc_ws, splits = _queue_pass(q.to(gemm_dtype).contiguous(), labels.contiguous(),
                                                 queue_weights.contiguous(), queue_labels.contiguous(), scale,
                                                 filter_threshold, with_accumulator)
    return _merge(max_ws, sum_ws, acc_ws, splits, with_accumulator=with_accumulator)


def finalize(embeddings, class_weights, row_max, row_sum, accumulator, scale, m1, m2, m3, straight_through,
             compute_grad):
    """The loss algebra's finalize: (loss rows fp32 [N], gradient rows fp32 [N, D] or
    [0, D]) from the merged partials of every row (natural-log units)."""
    _check_device(embeddings.device)
    rows, dim = embeddings.shape
    q, x_norm = _normalised(embeddings)
    w, _ = _normalised(class_weights)
    pos_logit, pos_slope = _positive(q, w, scale, m1, m2, m3, straight_through)
    inv_norm = (1.0 / x_norm).reshape(rows).contiguous()
    # The merge kernel over one "split": the given partials, max back in log2 units.
    max_ws = (row_max.float() * LOG2E).reshape(rows, 1).contiguous()
    sum_ws = row_sum.float().reshape(rows, 1).contiguous()
    acc_ws = accumulator.float().reshape(rows, 1, dim).contiguous() if compute_grad else max_ws
    return _merge(max_ws, sum_ws, acc_ws, 1, with_accumulator=compute_grad, scale=scale,
                  finalize_inputs=(pos_logit, pos_slope, q, w, inv_norm, compute_grad))


def forward(embeddings, class_weights, labels, queue_weights, queue_labels, scale, m1, m2, m3,
            filter_threshold, straight_through, compute_grad, *, split_size=None, config=None):
    """(loss per row fp32 [N], gradient fp32 [N, D] or [0, D]) of docs/loss.md:
    partials per split, merge and finalize in two kernels.

    ``split_size`` (queue entries per split) and ``config`` (dict with BLOCK_M,
    BLOCK_K, num_warps, num_stages) override the automatic choice; tests use them.
    """
    rows, dim = embeddings.shape
    device = embeddings.device
    _check_device(device)
    gemm_dtype = gemm_dtype_of(queue_weights.dtype)
    f32 = dict(dtype=torch.float32, device=device)
    if rows == 0:
        return torch.empty(0, **f32), torch.empty((0, dim), **f32)
    q, x_norm = _normalised(embeddings)
    w, _ = _normalised(class_weights)
    pos_logit, pos_slope = _positive(q, w, scale, m1, m2, m3, straight_through)
    inv_norm = (1.0 / x_norm).reshape(rows).contiguous()
    max_ws, sum_ws, acc_ws, splits = _queue_pass(q.to(gemm_dtype).contiguous(), labels.contiguous(),
                                                 queue_weights.contiguous(), queue_labels.contiguous(), scale,
                                                 filter_threshold, compute_grad, split_size=split_size, config=config)
    return _merge(max_ws, sum_ws, acc_ws, splits, with_accumulator=compute_grad, scale=scale,
                  finalize_inputs=(pos_logit, pos_slope, q, w, inv_norm, compute_grad))


# ----------------------------------------------------------------------------
# The op


@torch.library.custom_op("dcq_ops::margin_cross_entropy_triton", mutates_args=())
def margin_cross_entropy_triton(
    embeddings: torch.Tensor,
    class_weights: torch.Tensor,
    labels: torch.Tensor,
    queue_weights: torch.Tensor,
    queue_labels: torch.Tensor,
    scale: float,
    m1: float,
    m2: float,
    m3: float,
    filter_threshold: float,
    straight_through: bool,
    compute_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss of docs/loss.md fused in Triton: (loss per row fp32 [N], gradient
    of each row's loss with respect to the embeddings fp32 [N, D], or [0, D] when
    compute_grad is false). Arguments are checked by dcq_cross_entropy."""
    return forward(embeddings, class_weights, labels, queue_weights, queue_labels, scale, m1, m2, m3,
                   filter_threshold, straight_through, compute_grad)


@margin_cross_entropy_triton.register_fake
def _margin_cross_entropy_triton_fake(
    embeddings, class_weights, labels, queue_weights, queue_labels,
    scale, m1, m2, m3, filter_threshold, straight_through, compute_grad,
):
    return fused_fake(embeddings, compute_grad)


register_fused_autograd("dcq_ops::margin_cross_entropy_triton", num_inputs=12)
