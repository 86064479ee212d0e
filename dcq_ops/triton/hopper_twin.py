"""The plain-Triton twin of the pipelined sm_90 queue pass (dcq_ops.triton.hopper).

Gluon has no CPU interpreter, so the numerics of the Gluon kernel rest on this
twin: the same algebra, operation for operation, on the same inputs (host
tensor descriptors for q and the queue tiles, zero-filled past the queue's end;
the split size a multiple of BLOCK_K; the accumulator rescaled only when some
row's alpha is not 1). Under TRITON_INTERPRET=1 the tests run it bit for bit
against kernels.queue_pass_kernel; the launch (dcq_ops.triton.hopper_launch)
runs it there in place of the Gluon kernel. It is not meant for a GPU: there the
classic kernel or the Gluon one runs.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def hopper_twin_queue_pass_kernel(
    q_desc, w_desc, labels_ptr, queue_labels_ptr,
    max_ws_ptr, sum_ws_ptr, acc_ws_ptr,
    num_rows, queue_size, dim, num_splits, split_size,
    scale_log2, interclass_filtering_threshold,
    FILTER: tl.constexpr, COMPUTE_GRAD: tl.constexpr, RESCALE_ON_GROWTH: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """hopper_queue_pass_kernel's program: q_desc [N, D] with block [BLOCK_M,
    BLOCK_D], w_desc [K, D] with block [BLOCK_K, BLOCK_D]; writes the workspace
    as queue_pass_kernel does."""
    row_blocks = tl.cdiv(num_rows, BLOCK_M)
    pid = tl.program_id(0)
    split = pid // row_blocks
    row0 = (pid % row_blocks) * BLOCK_M
    rows = row0 + tl.arange(0, BLOCK_M)
    row_ok = rows < num_rows
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < dim
    k_begin = split * split_size
    k_end = tl.minimum(k_begin + split_size, queue_size)

    q = q_desc.load([row0, 0])  # rows past N and columns past D read as 0
    labels = tl.load(labels_ptr + rows, mask=row_ok, other=-1)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for k0 in range(k_begin, k_end, BLOCK_K):
        # A tile never straddles two splits (split_size % BLOCK_K == 0); past the
        # queue's end the descriptor reads 0 and the labels read as empty (-1).
        w = w_desc.load([k0, 0])
        ks = k0 + tl.arange(0, BLOCK_K)
        queue_labels = tl.load(queue_labels_ptr + ks, mask=ks < k_end, other=-1)

        cos = tl.dot(q, tl.trans(w), input_precision=INPUT_PRECISION)
        keep = (queue_labels[None, :] >= 0) & (queue_labels[None, :] != labels[:, None])
        z = cos * scale_log2
        if FILTER:
            filtered = cos > interclass_filtering_threshold
            z = tl.where(filtered, 0.0, z)
        z = tl.where(keep, z + cos * 0.0, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(z, axis=1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_ref)
        p = tl.exp2(z - m_ref[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if COMPUTE_GRAD:
            if FILTER:
                p = tl.where(filtered, 0.0, p)
            if RESCALE_ON_GROWTH:
                # x * 1 == x: skipping the rescale when no row's alpha differs
                # from 1 leaves the accumulator bit for bit as the rescale would.
                if tl.max(tl.where(alpha != 1.0, 1, 0), axis=0) > 0:
                    acc = acc * alpha[:, None]
            else:
                acc = acc * alpha[:, None]
            acc = tl.dot(p.to(w.dtype), w, acc, input_precision=INPUT_PRECISION)
        m_i = m_new

    if COMPUTE_GRAD:
        acc_finite = tl.min(tl.where(acc - acc == 0.0, 1, 0), axis=1) == 1
        m_i = tl.where((l_i - l_i == 0.0) & ~acc_finite, float("nan"), m_i)
    ws = rows.to(tl.int64) * num_splits + split
    tl.store(max_ws_ptr + ws, m_i, mask=row_ok)
    tl.store(sum_ws_ptr + ws, l_i, mask=row_ok)
    if COMPUTE_GRAD:
        tl.store(acc_ws_ptr + ws[:, None] * dim + cols[None, :], acc, mask=row_ok[:, None] & col_ok[None, :])
