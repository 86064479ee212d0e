"""Fused Triton backend of the DCQ margin cross-entropy (docs/loss.md).

One pass over the queue gives the loss *and* the gradient, as flash attention
gives softmax(QK^T)V: for a block of rows and a tile of queue entries,

    cos  = q @ W_tile^T                       (tl.dot, fp32 accumulation)
    z    = s * cos, masked (excluded → -inf), filtered (→ 0, no gradient)
    m    = running max of z,  l = running sum of exp(z - m)
    acc  = acc * exp(m_old - m) + exp(z - m) @ W_tile

so the logits live in registers only and forward + backward cost the two GEMMs
(4·N·K·D FLOPs). The queue is split across programs so that a small batch still
fills the GPU; each (row block, split) program writes its partial (m, l, acc)
to a workspace, and a second small kernel combines the splits of each row and
finalises it exactly like ``finalize_row`` in csrc/common/margin.h:

    loss     = softplus(lse_neg - z_pos)
    coef_pos = -sigmoid(lse_neg - z_pos) * dz_pos/dc   (never 1 - p_pos)
    coef_neg = s * exp(m - lse_all)
    grad_q   = coef_pos * w + coef_neg * acc
    grad_x   = (grad_q - q (q · grad_q)) / ||x||

The O(N·D) prologue (normalisation, positive cosine, margin of the positive and
its derivative) is plain PyTorch and reuses dcq_ops.reference's margin
functions, so every backend agrees on the margin's value and slope.

The op returns (loss per row, d loss_row / d embeddings): the backward only
scales the saved gradient (dcq_ops.ops.fused_autograd), so it never reads the
queue, which DCQLoss overwrites right after the forward (docs/loss.md, "The queue and the backward").
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

# Whether the kernels below were decorated for Triton's CPU interpreter. Triton
# reads TRITON_INTERPRET when @triton.jit runs, i.e. when this module is first
# imported; later changes of the variable do not change what these kernels are.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Upper bound of the split workspace (partial max, sum and accumulator of each
# row in each split). The budget is 128 MiB at N=4096, K=2^20, D=512.
WORKSPACE_LIMIT_BYTES = 96 << 20


# Splits are multiples of this many queue entries (the largest BLOCK_K below),
# so that no tile but the queue's last one is partial.
SPLIT_ALIGN = 128

# Each split gets at least this many queue entries: a shorter loop would spend
# more time writing its [BLOCK_M, D] partial accumulator than reading the queue.
MIN_SPLIT_SIZE = 512

# The interpreter runs one fixed, small configuration: autotuning there would
# only multiply the (slow) interpreted runs.
_INTERPRETER_CONFIG = dict(BLOCK_M=16, BLOCK_K=32, num_warps=4, num_stages=1)
_INTERPRETER_SLOTS = 4  # enough splits to exercise the combination of splits


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
    FILTER: tl.constexpr, COMPUTE_GRAD: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Rows [pid_m*BLOCK_M, +BLOCK_M) against queue entries of split pid_s.

    Writes, per row, the max m (in log2 units) of the kept logits of the split,
    sum_j exp2(z_j - m), and (COMPUTE_GRAD) sum_j exp2(z_j - m) * W_j over the
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
        if COMPUTE_GRAD:
            if FILTER:
                p = tl.where(filtered, 0.0, p)
            # p in [0, 1] goes to the GEMM in the compute dtype, as in the
            # chunked backend; the product accumulates in fp32.
            acc = tl.dot(p.to(w.dtype), w, acc * alpha[:, None], input_precision=INPUT_PRECISION)
        m_i = m_new

    ws = rows.to(tl.int64) * num_splits + pid_s  # workspace layout [N, S(, D)]
    tl.store(max_ws_ptr + ws, m_i, mask=row_ok)
    tl.store(sum_ws_ptr + ws, l_i, mask=row_ok)
    if COMPUTE_GRAD:
        tl.store(acc_ws_ptr + ws[:, None] * dim + cols[None, :], acc,
                 mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _combine_kernel(
    max_ws_ptr, sum_ws_ptr, acc_ws_ptr,
    pos_logit_ptr, pos_slope_ptr, q_ptr, w_ptr, inv_norm_ptr,
    loss_ptr, grad_ptr,
    num_rows, dim, num_splits, scale,
    COMPUTE_GRAD: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Rows [pid*BLOCK_R, +BLOCK_R): merge their splits' (m, l, acc), then
    finalize_row and the projection through the normalisation of x.

    Splits are read BLOCK_S at a time ([BLOCK_R, BLOCK_S, BLOCK_D] tiles), so
    that many loads are in flight even for a small batch split many ways."""
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
    m_row = tl.max(m_tile, axis=1)  # log2 units
    m_ref = tl.where(m_row == float("-inf"), 0.0, m_row)  # no kept entry at all: see below

    l_tile = tl.zeros([BLOCK_R, BLOCK_S], dtype=tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    for s0 in range(0, num_splits, BLOCK_S):
        ok = row_ok[:, None] & (s0 + splits < num_splits)[None, :]
        ws = ws_rows[:, None] + s0 + splits[None, :]
        m_split = tl.load(max_ws_ptr + ws, mask=ok, other=float("-inf"))
        alpha = tl.exp2(m_split - m_ref[:, None])  # 0 for a split that kept nothing (its l, acc are 0)
        l_tile += alpha * tl.load(sum_ws_ptr + ws, mask=ok, other=0.0)
        if COMPUTE_GRAD:
            part = tl.load(acc_ws_ptr + ws[:, :, None] * dim + cols[None, None, :],
                           mask=ok[:, :, None] & col_ok[None, None, :], other=0.0)
            acc += tl.sum(alpha[:, :, None] * part, axis=1)
    row_sum = tl.sum(l_tile, axis=1)

    # finalize_row (csrc/common/margin.h). Every queue entry excluded <=> row_sum
    # = 0: loss 0 and gradient 0, with harmless stand-ins so nothing is NaN.
    has_negative = row_sum > 0.0
    z_pos = tl.load(pos_logit_ptr + rows, mask=row_ok, other=0.0)
    m_nat = m_ref * 0.6931471805599453  # back to natural-log units (x ln 2)
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


# ----------------------------------------------------------------------------
# Launch configuration


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def compute_dtype(embeddings_dtype: torch.dtype, queue_dtype: torch.dtype) -> torch.dtype:
    """The GEMMs' operand dtype: the promoted input dtype (fp64 runs in fp32, as in chunked)."""
    dtype = torch.promote_types(embeddings_dtype, queue_dtype)
    return torch.float32 if dtype == torch.float64 else dtype


def block_rows(block_d: int, element_size: int) -> int:
    """Rows per program on a GPU: as many as keep the fp32 accumulator
    [BLOCK_M, BLOCK_D] within 128 KiB of registers and the q tile within 64 KiB
    (more rows = more reuse of each queue tile loaded). fp32 operands multiply
    on the FMA units with their tiles in registers: at most 32 rows from D=128
    on (more spill; scripts/triton_compile_check.py)."""
    block_m = 128 if element_size < 4 else (64 if block_d <= 64 else 32)
    while block_m > 16 and (block_m * block_d * 4 > 128 << 10 or block_m * block_d * element_size > 64 << 10):
        block_m //= 2
    return block_m


# (BLOCK_K, num_warps, num_stages) tried by the autotuner, best guesses first.
# 16-bit operands run on the tensor cores (wgmma on Hopper); fp32 operands
# with exact ("ieee") products run on the FMA units, whose tl.dot keeps whole
# operand tiles in registers: thin queue tiles only (wider ones spill).
_GPU_CANDIDATES_16BIT = ((64, 8, 2), (32, 8, 3), (128, 8, 2), (64, 4, 3), (32, 4, 2))
_GPU_CANDIDATES_FP32 = ((16, 8, 2), (16, 8, 1))
_SHARED_MEMORY_BUDGET = 200 << 10  # H100/H200 allow 227 KiB per block; leave Triton some


def gpu_configs(block_m: int, block_d: int, element_size: int) -> list[dict]:
    """The configurations worth trying for this tile shape: those whose queue
    tiles (num_stages deep), q tile and probability tile fit in shared memory,
    and 4 warps only while the accumulator needs at most 64 registers a thread.
    scripts/triton_compile_check.py checks that each compiles without spills."""
    candidates = _GPU_CANDIDATES_FP32 if element_size == 4 else _GPU_CANDIDATES_16BIT
    configs = []
    for block_k, num_warps, num_stages in candidates:
        shared = (block_m * block_d + num_stages * block_k * block_d + block_m * block_k) * element_size
        if shared > _SHARED_MEMORY_BUDGET:
            continue
        if num_warps == 4 and block_m * block_d > 64 * 32 * 4:
            continue
        configs.append(dict(BLOCK_K=block_k, num_warps=num_warps, num_stages=num_stages))
    # The smallest tile always fits (wide D in fp32).
    return configs or [dict(BLOCK_K=16, num_warps=8, num_stages=1)]


@functools.lru_cache(maxsize=None)
def _multiprocessors(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


@functools.lru_cache(maxsize=256)
def plan_splits(rows: int, queue_size: int, dim: int, block_m: int, compute_grad: bool,
                slots: int, align: int = SPLIT_ALIGN, min_split: int = MIN_SPLIT_SIZE) -> tuple[int, int]:
    """(split_size, num_splits) of the queue for `slots` programs running at once.

    The main kernel runs one program per multiprocessor at a time (its
    accumulator and tiles take most of the registers and shared memory), so
    its time goes as waves × work per program = ceil(row_blocks·S / slots) · K/S.
    The plan takes the fewest splits within 5% of the fastest (more splits
    cost workspace and combining), with split sizes a multiple of align, at
    least min_split entries per split, and the workspace under
    WORKSPACE_LIMIT_BYTES. A batch of 128 rows (2 row blocks) is thus split
    about slots/2 ways and fills every multiprocessor.
    """
    if queue_size == 0:
        return 1, 1  # one program per row block, which sees no entry: loss 0
    row_blocks = _cdiv(rows, block_m)
    bytes_per_split = rows * 4 * (2 + (dim if compute_grad else 0))
    max_splits = max(1, min(queue_size // min_split, WORKSPACE_LIMIT_BYTES // bytes_per_split))
    sizes = {}  # number of splits -> split size (a multiple of align)
    for splits in range(1, max_splits + 1):
        size = _cdiv(_cdiv(queue_size, splits), align) * align
        sizes[_cdiv(queue_size, size)] = size
    time = {splits: _cdiv(row_blocks * splits, slots) * size for splits, size in sizes.items()}
    fastest = min(time.values())
    splits = min(n for n, t in time.items() if t * 0.95 <= fastest)
    return sizes[splits], splits


# Elements of the combine kernel's [BLOCK_R, BLOCK_S, BLOCK_D] tile (32 fp32
# registers a thread at 4 warps).
_COMBINE_TILE = 4096


def combine_blocks(rows: int, num_splits: int, block_d: int, programs: int) -> tuple[int, int]:
    """(BLOCK_R, BLOCK_S) of the combine kernel: rows per program so that about
    `programs` programs run, then as many splits per tile as fit _COMBINE_TILE."""
    block_r = 1
    while block_r * 2 * programs <= rows and block_r * 2 * block_d * 2 <= _COMBINE_TILE:
        block_r *= 2
    block_s = 2  # tl.arange needs at least 2 elements on every Triton version
    while block_s < num_splits and block_r * block_s * 2 * block_d <= _COMBINE_TILE:
        block_s *= 2
    return block_r, block_s


def _combine_programs(device: torch.device) -> int:
    if device.type == "cuda":
        return 2 * _multiprocessors(_device_index(device))
    return 1  # the interpreter runs programs one after the other: as few as possible


def _device_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


_AUTOTUNED: dict = {}


def _autotuned_kernel(block_m: int, block_d: int, element_size: int):
    """The main kernel behind an autotuner over gpu_configs(...) (one per tile shape)."""
    key = (block_m, block_d, element_size)
    if key not in _AUTOTUNED:
        configs = [
            triton.Config({"BLOCK_K": c["BLOCK_K"]}, num_warps=c["num_warps"], num_stages=c["num_stages"])
            for c in gpu_configs(block_m, block_d, element_size)
        ]
        _AUTOTUNED[key] = triton.autotune(
            configs=configs, key=["dim", "row_bucket", "split_bucket", "COMPUTE_GRAD", "FILTER"]
        )(_queue_pass_kernel)
    return _AUTOTUNED[key]


def _autotune_enabled() -> bool:
    # DCQ_TRITON_AUTOTUNE=0 uses the first configuration (fast start, e.g. tests).
    return os.environ.get("DCQ_TRITON_AUTOTUNE", "1") != "0"


def _input_precision(dtype: torch.dtype):
    """fp32 GEMMs honour torch's TF32 setting (exact "ieee" by default, like the
    chunked backend's at::mm); 16-bit operands are multiplied exactly anyway."""
    if dtype != torch.float32:
        return None
    return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"


# ----------------------------------------------------------------------------
# Forward


def forward(embeddings, class_weights, labels, queue_weights, queue_labels, scale, m1, m2, m3,
            filter_threshold, straight_through, compute_grad, *, split_size=None, config=None):
    """(loss per row fp32 [N], gradient fp32 [N, D] or [0, D]) of docs/loss.md.

    ``split_size`` (queue entries per split) and ``config`` (dict with BLOCK_M,
    BLOCK_K, num_warps, num_stages) override the automatic choice; tests use them.
    """
    rows, dim = embeddings.shape
    queue_size = queue_weights.shape[0]
    device = embeddings.device
    if device.type != "cuda" and not INTERPRETED:
        raise RuntimeError(
            f"the triton backend runs on CUDA tensors, got tensors on {device}; for CPU tensors set "
            "TRITON_INTERPRET=1 before dcq_ops.triton.margin_ce is first imported (Triton's interpreter)"
        )
    f32 = dict(dtype=torch.float32, device=device)
    loss = torch.empty(rows, **f32)
    grad = torch.empty((rows if compute_grad else 0, dim), **f32)
    if rows == 0:
        return loss, grad

    # Prologue, O(N·D) in fp32, as in the chunked backend and the reference.
    x = embeddings.float()
    x_norm = x.norm(dim=1, keepdim=True).clamp_min(1e-12)
    q = x / x_norm
    class_w = class_weights.float()
    w = (class_w / class_w.norm(dim=1, keepdim=True).clamp_min(1e-12)).contiguous()
    positive_cos = (q * w).sum(dim=1)
    positive_logit = (scale * margin_value(positive_cos, m1, m2, m3)).contiguous()
    if straight_through:
        positive_slope = torch.full_like(positive_cos, scale)
    else:
        positive_slope = (scale * margin_derivative(positive_cos, m1, m2)).contiguous()
    inv_norm = (1.0 / x_norm).reshape(rows).contiguous()
    q = q.contiguous()

    gemm_dtype = compute_dtype(embeddings.dtype, queue_weights.dtype)
    q_gemm = q.to(gemm_dtype).contiguous()
    queue_w = queue_weights.contiguous()  # cast tile by tile in the kernel
    labels = labels.contiguous()
    queue_l = queue_labels.contiguous()

    block_d = max(16, _next_pow2(dim))
    element_size = torch.empty((), dtype=gemm_dtype).element_size()
    autotune = False
    if config is not None:
        config = dict(config)
    elif INTERPRETED:
        config = dict(_INTERPRETER_CONFIG)
    else:
        block_m = block_rows(block_d, element_size)
        config = dict(BLOCK_M=block_m, **gpu_configs(block_m, block_d, element_size)[0])
        autotune = _autotune_enabled()
    block_m = config.pop("BLOCK_M")

    if split_size is None:
        if device.type == "cuda":
            split_size, num_splits = plan_splits(rows, queue_size, dim, block_m, bool(compute_grad),
                                                 _multiprocessors(_device_index(device)))
        else:
            split_size, num_splits = plan_splits(rows, queue_size, dim, block_m, compute_grad,
                                                 _INTERPRETER_SLOTS, align=config["BLOCK_K"],
                                                 min_split=config["BLOCK_K"])
    else:
        split_size = int(split_size)
        if split_size <= 0:
            raise ValueError(f"split_size must be positive, got {split_size}")
        num_splits = max(1, _cdiv(queue_size, split_size))

    max_ws = torch.empty((rows, num_splits), **f32)
    sum_ws = torch.empty((rows, num_splits), **f32)
    acc_ws = torch.empty((rows, num_splits, dim) if compute_grad else (1,), **f32)

    threshold = float(filter_threshold)
    main_args = (
        q_gemm, labels, queue_w, queue_l, max_ws, sum_ws, acc_ws,
        rows, queue_size, dim, num_splits, split_size,
        float(scale) * 1.4426950408889634,  # scale * log2(e): logits in log2 units
        threshold,
        max(16, _next_pow2(rows)), _next_pow2(split_size),
    )
    flags = dict(FILTER=threshold > 0, COMPUTE_GRAD=bool(compute_grad),
                 INPUT_PRECISION=_input_precision(gemm_dtype), BLOCK_M=block_m, BLOCK_D=block_d)
    grid = (_cdiv(rows, block_m), num_splits)
    block_r, block_s = combine_blocks(rows, num_splits, block_d, programs=_combine_programs(device))
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        if autotune:
            _autotuned_kernel(block_m, block_d, element_size)[grid](*main_args, **flags)
        else:
            _queue_pass_kernel[grid](*main_args, **flags, **config)
        _combine_kernel[(_cdiv(rows, block_r),)](
            max_ws, sum_ws, acc_ws, positive_logit, positive_slope, q, w, inv_norm, loss, grad,
            rows, dim, num_splits, float(scale),
            COMPUTE_GRAD=bool(compute_grad), BLOCK_R=block_r, BLOCK_S=block_s, BLOCK_D=block_d, num_warps=4,
        )
    return loss, grad


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
    """The loss of docs/loss.md fused in Triton: (loss per row fp32 [N], gradient of each
    row's loss with respect to the embeddings fp32 [N, D], or [0, D] when
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
