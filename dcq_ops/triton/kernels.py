"""The @triton.jit kernels of the Triton backend (docs/loss.md), the loss algebra
in three kernels:

- ``queue_pass_kernel``, the partials: for a block of rows and a split of the
  queue, one pass over the split's tiles, as flash attention gives softmax(QK^T)V:

      cos  = q @ W_tile^T                       (tl.dot, fp32 accumulation)
      z    = s * cos, masked (excluded -> -inf), filtered (-> 0, no gradient)
      m    = running max of z,  l = running sum of exp(z - m)
      acc  = acc * exp(m_old - m) + exp(z - m) @ W_tile

  so the logits live in registers only and forward + backward cost the two
  GEMMs (4 N K D FLOPs). The queue is split across programs so that a small
  batch still fills the GPU; each (row block, split) program writes its
  partial (m, l, acc) to a workspace;
- ``repair_kernel``, after it: the rows whose accumulator a non-finite queue slot
  they exclude made NaN (a no-op otherwise);
- ``merge_kernel``: combines the splits of each row (a max, then the rescaled
  sums) and either writes the merged partials or, in the same kernel, the loss
  and the gradient of each row (_finalize_rows: softplus(lse_neg - z_pos), the
  positive's factor as the negatives' probability sigmoid(lse_neg - z_pos),
  never 1 - p_pos, and the projection through the normalisation of x).

Maxima and logits are in log2 units inside the kernels (exp2 is the hardware's
exponential); the merged partials they write are in natural-log units.
dcq_ops.triton.launch plans and launches these kernels; dcq_ops.triton.ops
registers the ops.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

# Whether the kernels below were decorated for Triton's CPU interpreter. Triton
# reads TRITON_INTERPRET when @triton.jit runs, i.e. when this module is first
# imported; later changes of the variable do not change what these kernels are.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"

# log2(e): the launches scale the logits by it (natural -> log2 units).
LOG2E = 1.4426950408889634
# ln(2): the merge kernel's way back (log2 -> natural-log units).
LN2 = tl.constexpr(0.6931471805599453)


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
def _block(num_rows, dim, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """The rows, columns and queue split of a program of the queue-pass grid.

    The grid is one-dimensional, program = split * row_blocks + row_block
    (dcq_ops.triton.launch.queue_pass_grid): CUDA caps grid dimensions 1 and 2
    at 65,535 programs, dimension 0 at 2^31 - 1, and an explicit split plan can
    ask for far more than 65,535 splits. Row blocks vary fastest, as the x
    dimension of the former (row block, split) grid did, so the programs that
    run at the same time share their split's queue tiles in L2.
    """
    row_blocks = tl.cdiv(num_rows, BLOCK_M)
    pid = tl.program_id(0)
    split = pid // row_blocks
    rows = (pid % row_blocks) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < num_rows
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < dim  # D need not be a power of two: padded columns are 0
    return rows, row_ok, cols, col_ok, split


@triton.jit
def _block_partials(q_ptr, labels_ptr, w_ptr, queue_labels_ptr, rows, row_ok, cols, col_ok, split,
                    dim, queue_size, split_size, scale_log2, interclass_filtering_threshold, chain_break,
                    FILTER: tl.constexpr, COMPUTE_GRAD: tl.constexpr, ZERO_NONFINITE_IN_GEMM2: tl.constexpr,
                    INPUT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                    BLOCK_D: tl.constexpr):
    """(m, l, acc) of the program's rows over the queue entries of its split,
    tile by tile, with the online log-sum-exp (m in log2 units).

    ``chain_break`` is a run-time integer whose value does not matter (see the
    second dot below); the launches pass CHAIN_BREAK."""
    q = tl.load(q_ptr + rows[:, None].to(tl.int64) * dim + cols[None, :],
                mask=row_ok[:, None] & col_ok[None, :], other=0.0)
    # Padded rows get label -1; they are never stored.
    labels = tl.load(labels_ptr + rows, mask=row_ok, other=-1)
    k_begin = split * split_size
    k_end = tl.minimum(k_begin + split_size, queue_size)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
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
            filtered = cos > interclass_filtering_threshold
            z = tl.where(filtered, 0.0, z)
        # + cos * 0: NaN for a non-finite cosine (only a non-finite input makes
        # one), which makes the row's sum NaN where exp2(-inf) = 0 or filtering
        # would hide it.
        z = tl.where(keep, z + cos * 0.0, float("-inf"))

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
            if ZERO_NONFINITE_IN_GEMM2:
                w = tl.where(w - w == 0.0, w, 0.0)
            # p in [0, 1] goes to the GEMM in the compute dtype, as in the
            # chunked backend; the product accumulates in fp32.
            #
            # The two branches compute the same operands (x * y == y * x
            # exactly), so the result never depends on chain_break. They are
            # there for the compiler: Triton lays a dot whose result feeds
            # another dot (its forward slice, which stops at an scf.if's
            # yield) out with every warp along the rows, warpsPerCTA = [8, 1]
            # at 8 warps. A wgmma covers 64 rows, so with BLOCK_M = 64 both
            # warpgroups would then compute the whole cosine tile and all its
            # exponentials (MMA FLOPs / ideal 1.5, 2.1 exponentials a logit on
            # sm_90). Behind the branch, the first dot gets [4, 2] (each
            # warpgroup half of BLOCK_K) and P reaches the second dot through
            # shared memory: ideal work. chain_break is a kernel argument that
            # Triton never specialises (do_not_specialize), so no compiler can
            # fold the branch; benchmarks/compiled.py checks the layout in CI.
            if chain_break == 0:
                p_op = p.to(w.dtype)
                acc_op = acc * alpha[:, None]
            else:
                p_op = p.to(w.dtype)
                acc_op = alpha[:, None] * acc
            acc = tl.dot(p_op, w, acc_op, input_precision=INPUT_PRECISION)
        m_i = m_new
    return m_i, l_i, acc


# The value the launches pass as chain_break (any value gives the same result).
CHAIN_BREAK = 0

# Integer arguments of the queue-pass and repair kernels that Triton's launcher must not
# specialise by value. It would otherwise compile a kernel of its own for a 1 (a
# constant) and for a multiple of 16 (a divisibility hint), and some of those spill
# where the report's kernel does not (Triton 3.6, sm_90's 64 x 64 with num_splits = 1:
# 72 B). chain_break: see _block_partials. num_rows keeps its hint: the launches pad
# the rows to a multiple of 16 (dcq_ops.triton.launch.ROW_ALIGN), because rows that
# lose it spill (sm_100's 16-bit default 92-96 B, exact fp32 12-60 B). What each
# costs: benchmarks/NOTES.md, "What the compiler made of the Triton kernel". The queue
# pass's autotuning keys (unused in its body) too: a split_bucket of 1 would be one more
# kernel, the same code compiled again.
RUNTIME_INTEGERS = ["chain_break", "num_splits", "queue_size", "split_size"]


@triton.jit(do_not_specialize=RUNTIME_INTEGERS + ["row_bucket", "split_bucket"])
def queue_pass_kernel(
    q_ptr, labels_ptr, w_ptr, queue_labels_ptr,
    max_ws_ptr, sum_ws_ptr, acc_ws_ptr,
    num_rows, queue_size, dim, num_splits, split_size,
    scale_log2, interclass_filtering_threshold, chain_break,
    row_bucket, split_bucket,  # autotuning keys only
    FILTER: tl.constexpr, COMPUTE_GRAD: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """A block of BLOCK_M rows against the queue entries of one split (_block).

    Writes, per row, the max m (in log2 units) of the kept logits of the split,
    sum_j exp2(z_j - m), and (COMPUTE_GRAD) sum_j exp2(z_j - m) * W_j over the
    entries that carry a gradient (kept and not filtered).

    The second GEMM multiplies the probability 0 of an excluded slot by its
    weights, so a non-finite slot that a row excludes would still make the
    row's accumulator NaN (0 * NaN). Such a row, with a finite sum and a
    non-finite accumulator, exists only when the queue holds a non-finite
    value: its max is written as NaN, and repair_kernel (launched after this
    one, a no-op otherwise) computes its partials again with those values
    zeroed in the second GEMM (the rows that keep them stay NaN). Were it not
    run, the row would be NaN, never wrong.
    """
    rows, row_ok, cols, col_ok, split = _block(num_rows, dim, BLOCK_M, BLOCK_D)
    m_i, l_i, acc = _block_partials(q_ptr, labels_ptr, w_ptr, queue_labels_ptr, rows, row_ok, cols, col_ok, split,
                                    dim, queue_size, split_size, scale_log2, interclass_filtering_threshold,
                                    chain_break, FILTER, COMPUTE_GRAD, False, INPUT_PRECISION, BLOCK_M, BLOCK_K,
                                    BLOCK_D)
    if COMPUTE_GRAD:
        acc_finite = tl.min(tl.where(acc - acc == 0.0, 1, 0), axis=1) == 1
        m_i = tl.where((l_i - l_i == 0.0) & ~acc_finite, float("nan"), m_i)

    ws = rows.to(tl.int64) * num_splits + split  # workspace layout [N, S(, D)]
    tl.store(max_ws_ptr + ws, m_i, mask=row_ok)
    tl.store(sum_ws_ptr + ws, l_i, mask=row_ok)
    if COMPUTE_GRAD:
        tl.store(acc_ws_ptr + ws[:, None] * dim + cols[None, :], acc,
                 mask=row_ok[:, None] & col_ok[None, :])


@triton.jit(do_not_specialize=RUNTIME_INTEGERS)
def repair_kernel(q_ptr, labels_ptr, w_ptr, queue_labels_ptr, max_ws_ptr, sum_ws_ptr, acc_ws_ptr,
                  num_rows, queue_size, dim, num_splits, split_size, scale_log2, interclass_filtering_threshold,
                  chain_break, FILTER: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    """The program of queue_pass_kernel's grid (COMPUTE_GRAD; the same arguments
    less the autotuning keys) again, for the rows it marked (max NaN, sum
    finite): their partials with the queue's non-finite values zeroed in the
    second GEMM. Reads two numbers a row otherwise."""
    rows, row_ok, cols, col_ok, split = _block(num_rows, dim, BLOCK_M, BLOCK_D)
    ws = rows.to(tl.int64) * num_splits + split
    m_old = tl.load(max_ws_ptr + ws, mask=row_ok, other=0.0)
    l_old = tl.load(sum_ws_ptr + ws, mask=row_ok, other=0.0)
    marked = row_ok & (m_old != m_old) & (l_old - l_old == 0.0)
    if tl.max(marked.to(tl.int32), axis=0) > 0:
        m_i, l_i, acc = _block_partials(q_ptr, labels_ptr, w_ptr, queue_labels_ptr, rows, row_ok, cols, col_ok,
                                        split, dim, queue_size, split_size, scale_log2,
                                        interclass_filtering_threshold, chain_break, FILTER, True, True,
                                        INPUT_PRECISION, BLOCK_M, BLOCK_K, BLOCK_D)
        tl.store(max_ws_ptr + ws, m_i, mask=marked)
        tl.store(sum_ws_ptr + ws, l_i, mask=marked)
        tl.store(acc_ws_ptr + ws[:, None] * dim + cols[None, :], acc, mask=marked[:, None] & col_ok[None, :])


@triton.jit
def _finalize_rows(rows, row_ok, m_nat, row_sum, acc, cols, col_ok,
                   pos_logit_ptr, pos_slope_ptr, q_ptr, w_ptr, inv_norm_ptr, loss_ptr, grad_ptr,
                   dim, scale, COMPUTE_GRAD: tl.constexpr):
    """The loss and the gradient of rows from their merged partials (natural-log
    units). A row with every queue entry excluded (row_sum = 0) has loss 0 and
    gradient 0, with harmless stand-ins, unless its own embedding or class
    weight is not finite (z_pos is then NaN): NaN. A row that keeps a
    non-finite entry has a NaN row_sum, which makes it NaN throughout.

    ``inv_norm_ptr``: 1 / max(||x||, 1e-12) in float64, negated for a row whose
    norm is below 1e-12 (F.normalize's floor: q = x / 1e-12 there, a linear map
    whose derivative has no projection). float64 because for rows near 1e38 it
    is below float32's normal range: the gradient is computed in fp32 up to that
    factor, multiplied in float64 and rounded to fp32 once, so that its entries,
    subnormal in fp32 for such rows, keep every bit fp32 can hold."""
    all_excluded = row_sum == 0.0
    z_pos = tl.load(pos_logit_ptr + rows, mask=row_ok, other=0.0)
    zero_or_nan = z_pos - z_pos
    lse_neg = m_nat + tl.log(tl.where(all_excluded, 1.0, row_sum))
    d = lse_neg - z_pos
    e = tl.exp(-tl.abs(d))
    log1p_e = _log1p(e)
    loss = tl.maximum(d, 0.0) + log1p_e  # softplus(d), exact for confident rows (d << 0)
    tl.store(loss_ptr + rows, tl.where(all_excluded, zero_or_nan, loss), mask=row_ok)
    if COMPUTE_GRAD:
        # 1 - p_pos as the negatives' total probability sigmoid(d).
        sigmoid_d = tl.where(d >= 0.0, 1.0 / (1.0 + e), e / (1.0 + e))
        coef_pos = -sigmoid_d * tl.load(pos_slope_ptr + rows, mask=row_ok, other=0.0)
        # p_ij = exp(z_ij - m) * exp(m - lse_all), and dz_ij/dc_ij = s.
        lse_all = tl.maximum(z_pos, lse_neg) + log1p_e
        coef_neg = scale * tl.exp(m_nat - lse_all)
        coef_pos = tl.where(all_excluded, zero_or_nan, coef_pos)
        coef_neg = tl.where(all_excluded, zero_or_nan, coef_neg)
        offs = rows[:, None].to(tl.int64) * dim + cols[None, :]
        mask = row_ok[:, None] & col_ok[None, :]
        q = tl.load(q_ptr + offs, mask=mask, other=0.0)
        w = tl.load(w_ptr + offs, mask=mask, other=0.0)
        grad_q = coef_pos[:, None] * w + coef_neg[:, None] * acc
        # Through q = x / ||x||: (I - q q^T) grad_q / ||x||.
        inv_norm = tl.load(inv_norm_ptr + rows, mask=row_ok, other=0.0)
        projection = tl.where(inv_norm < 0.0, 0.0, tl.sum(q * grad_q, axis=1))
        grad_x = (grad_q - q * projection[:, None]).to(tl.float64) * tl.abs(inv_norm)[:, None]
        tl.store(grad_ptr + offs, grad_x.to(tl.float32), mask=mask)


# num_splits keeps its specialisation on 1 (benchmarks/compiled.py compiles that kernel)
# but gets no divisibility hint: with one, Triton 3.6's merge of BLOCK_R = 1 row and
# BLOCK_S = 8 splits on sm_100 spills 16 B, the kernel without it none.
@triton.jit(do_not_specialize_on_alignment=["num_splits"])
def merge_kernel(
    max_ws_ptr, sum_ws_ptr, acc_ws_ptr,
    out_max_ptr, out_sum_ptr, out_acc_ptr,
    pos_logit_ptr, pos_slope_ptr, q_ptr, w_ptr, inv_norm_ptr, loss_ptr, grad_ptr,
    num_rows, dim, num_splits, scale,
    FINALIZE: tl.constexpr, COMPUTE_GRAD: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Rows [pid*BLOCK_R, +BLOCK_R): merge their splits' (m, l, acc) (m in log2
    units; acc only with COMPUTE_GRAD), then either finalise the rows (FINALIZE)
    or write the merged partials in natural-log units (the loss algebra's
    partials of the whole queue or shard). Splits are read BLOCK_S at a time
    ([BLOCK_R, BLOCK_S, BLOCK_D] tiles), so that many loads are in flight even
    for a small batch split many ways."""
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
        if COMPUTE_GRAD:
            part = tl.load(acc_ws_ptr + ws[:, :, None] * dim + cols[None, None, :],
                           mask=ok[:, :, None] & col_ok[None, None, :], other=0.0)
            acc += tl.sum(alpha[:, :, None] * part, axis=1)
    row_sum = tl.sum(l_tile, axis=1)

    if FINALIZE:
        _finalize_rows(rows, row_ok, m_ref * LN2, row_sum, acc, cols, col_ok,
                       pos_logit_ptr, pos_slope_ptr, q_ptr, w_ptr, inv_norm_ptr, loss_ptr, grad_ptr,
                       dim, scale, COMPUTE_GRAD)
    else:
        tl.store(out_max_ptr + rows, m_row * LN2, mask=row_ok)  # -inf stays -inf
        tl.store(out_sum_ptr + rows, row_sum, mask=row_ok)
        if COMPUTE_GRAD:
            offs = rows[:, None].to(tl.int64) * dim + cols[None, :]
            tl.store(out_acc_ptr + offs, acc, mask=row_ok[:, None] & col_ok[None, :])
