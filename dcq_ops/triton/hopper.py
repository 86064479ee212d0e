"""The pipelined sm_90 queue pass (16-bit operands), in Gluon: the partials of
dcq_ops.triton.kernels.queue_pass_kernel with the Hopper pipeline written out.

Why a second kernel: Triton's own pipeliner gets either the ideal work or
unserialized tensor cores on this loop, never both (issue 29). Gluon lets the
kernel choose the instruction shapes and the waits itself:

- both GEMMs on ``warpgroup_mma`` with the layouts of the ideal work: the cosine
  tile [BLOCK_M, BLOCK_K] laid out [4, 2] (each of the two warpgroups computes
  half of BLOCK_K over the whole D, each MMA issued once), the accumulator
  [BLOCK_M, BLOCK_D] laid out [4, 2] (each warpgroup holds half of D), and the
  probabilities P passed to the second GEMM through shared memory;
- the queue tiles arrive by TMA (a host tensor descriptor, zero-filled past
  the queue's end) into STAGES = 2 shared-memory buffers, each completing on
  its own mbarrier; the rows q once, by TMA too;
- the waits stand where a result is consumed, two per tile: the schedule of
  iteration i (OVERLAP_SOFTMAX=False, "load-ahead") is

      rescale acc (only if some row's max grew)
      issue  acc += P_i W_i                 (async)
      issue  S_{i+1} = q W_{i+1}^T          (async; its tile was loaded a tile ago)
      wait   until 1 group in flight        -> P_i W_i done, its buffer free
      load   W_{i+2} into that buffer       (TMA; in flight while S_{i+1} runs)
      wait   until 0 groups in flight       -> S_{i+1}
      softmax of S_{i+1} -> P_{i+1} in shared memory, alpha_{i+1}

  so the load of a tile is issued an iteration before its first GEMM, and the
  accumulator is never touched while a wgmma that writes it is in flight;
  OVERLAP_SOFTMAX=True is FA3's order instead: issue S_{i+1}, issue P_i W_i,
  wait for S_{i+1}, softmax of tile i+1 while P_i W_i runs (P double-buffered),
  wait, load W_{i+2} (its buffer is free only now: the load is exposed);
- with RESCALE_ON_GROWTH the accumulator is rescaled only when some row's
  running max grew (alpha != 1 for some row, FA4's rule): x * 1 == x exactly,
  so the partials are bit for bit those of the rescale on every tile.

The algebra, operation for operation, is kernels._block_partials':
dcq_ops.triton.hopper_twin holds the same algebra in plain Triton (tensor
descriptors, the same conditional rescale), which the tests run under the
interpreter bit for bit against queue_pass_kernel (Gluon has no interpreter).

Requirements of the launch (dcq_ops.triton.hopper_launch.RULES["pipelined"]): 16-bit
operands, BLOCK_M = 64, BLOCK_K = 64 at 8 warps, the split size a multiple of
BLOCK_K (a tile never straddles two splits, so the descriptor's zero fill at
the queue's end is the only mask W needs), at least one tile per split, and D
a multiple of 8 (TMA's 16-byte strides).

benchmarks/hopper_sass.py compiles it for sm_90 under each installed Triton
and reads the SASS counts (HGMMA, WARPGROUP.DEPBAR, UTMALDG, MUFU.EX2, ...).
"""

from __future__ import annotations

try:  # Gluon is in Triton >= 3.5; the package still imports without it.
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma,
                                                                  warpgroup_mma, warpgroup_mma_wait)
    AVAILABLE = True
except ImportError:  # pragma: no cover - older Triton
    AVAILABLE = False

# Shared-memory buffers of queue tiles (each [BLOCK_K, BLOCK_D] in the operands'
# dtype: 64 KiB at 64 x 512 bf16; with q and P, 2 stages take 200 KiB of the 227).
STAGES = 2
BLOCK_M = 64
BLOCK_K = 64
NUM_WARPS = 8


if AVAILABLE:
    # The CTA-wide barrier is gl.thread_barrier in Triton 3.6, gl.barrier in 3.8.
    _cta_barrier = gl.barrier if hasattr(gl, "barrier") else gl.thread_barrier

    @gluon.jit
    def program_range(num_rows, queue_size, split_size, BLOCK_M: gl.constexpr, BLOCK_K: gl.constexpr):
        """The program's first row, split, its queue range and its number of tiles
        (kernels._block: row blocks vary fastest; also the seesaw kernel's)."""
        row_blocks = gl.cdiv(num_rows, BLOCK_M)
        pid = gl.program_id(0)
        split = pid // row_blocks
        row0 = (pid % row_blocks) * BLOCK_M
        k_begin = split * split_size
        k_end = gl.minimum(k_begin + split_size, queue_size)
        return row0, split, k_begin, k_end, gl.cdiv(k_end - k_begin, BLOCK_K)

    @gluon.jit
    def softmax_rows(cos, m_i, l_i, labels, queue_labels_ptr, k0, k_end, scale_log2,
                     interclass_filtering_threshold, FILTER: gl.constexpr, BLOCK_K: gl.constexpr,
                     col_layout: gl.constexpr):
        """The online log-sum-exp step of one tile, as kernels._block_partials: (m_new,
        l_i, alpha, P) with P = exp2(z - m) and its filtered entries 0 (also the seesaw
        kernel's step, dcq_ops.triton.hopper_seesaw; P unused is compiled away)."""
        ks = k0 + gl.arange(0, BLOCK_K, layout=col_layout)
        queue_labels = gl.load(queue_labels_ptr + ks, mask=ks < k_end, other=-1)
        keep = (queue_labels[None, :] >= 0) & (queue_labels[None, :] != labels[:, None])
        z = cos * scale_log2
        if FILTER:
            filtered = cos > interclass_filtering_threshold
            z = gl.where(filtered, 0.0, z)
        z = gl.where(keep, z + cos * 0.0, float("-inf"))
        m_new = gl.maximum(m_i, gl.max(z, axis=1))
        m_ref = gl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = gl.exp2(m_i - m_ref)
        p = gl.exp2(z - m_ref[:, None])
        l_i = l_i * alpha + gl.sum(p, axis=1)
        if FILTER:
            p = gl.where(filtered, 0.0, p)
        return m_new, l_i, alpha, p

    @gluon.jit
    def _softmax_tile(cos, m_i, l_i, labels, queue_labels_ptr, k0, k_end, scale_log2,
                      interclass_filtering_threshold, p_smem, FILTER: gl.constexpr, COMPUTE_GRAD: gl.constexpr,
                      BLOCK_K: gl.constexpr, col_layout: gl.constexpr):
        """softmax_rows, with P stored to p_smem in the operands' dtype for the second
        GEMM: (m_new, l_i, alpha)."""
        m_new, l_i, alpha, p = softmax_rows(cos, m_i, l_i, labels, queue_labels_ptr, k0, k_end, scale_log2,
                                            interclass_filtering_threshold, FILTER, BLOCK_K, col_layout)
        if COMPUTE_GRAD:
            p_smem.store(p.to(p_smem.dtype))
            # P is written by ordinary stores and read by the tensor cores (the
            # async proxy), by both warpgroups: fence, then a CTA barrier.
            fence_async_shared()
            _cta_barrier()
        return m_new, l_i, alpha

    @gluon.jit
    def _rescaled(acc, alpha, acc_rows: gl.constexpr, ON_GROWTH: gl.constexpr):
        """acc * alpha per row; with ON_GROWTH only when some row's alpha is not 1
        (x * 1 == x, so the result is the same bit for bit)."""
        if ON_GROWTH:
            if gl.max(gl.where(alpha != 1.0, 1, 0), axis=0) > 0:
                acc = acc * gl.convert_layout(alpha, acc_rows)[:, None]
        else:
            acc = acc * gl.convert_layout(alpha, acc_rows)[:, None]
        return acc

    @gluon.jit
    def hopper_queue_pass_kernel(
        q_desc, w_desc, labels_ptr, queue_labels_ptr,
        max_ws_ptr, sum_ws_ptr, acc_ws_ptr,
        num_rows, queue_size, dim, num_splits, split_size,
        scale_log2, interclass_filtering_threshold,
        FILTER: gl.constexpr, COMPUTE_GRAD: gl.constexpr, STAGES: gl.constexpr, RESCALE_ON_GROWTH: gl.constexpr,
        OVERLAP_SOFTMAX: gl.constexpr,
    ):
        """queue_pass_kernel's program (same grid, same workspace) on descriptors:
        q_desc [N, D] with block [BLOCK_M, BLOCK_D], w_desc [K, D] with block
        [BLOCK_K, BLOCK_D], both NVMMA-swizzled, in the operands' dtype."""
        BLOCK_M: gl.constexpr = q_desc.block_type.shape[0]
        BLOCK_D: gl.constexpr = q_desc.block_type.shape[1]
        BLOCK_K: gl.constexpr = w_desc.block_type.shape[0]
        dtype: gl.constexpr = w_desc.dtype
        # [4, 2]: each warpgroup half of the tile's columns (the ideal work).
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 2],
                                                           instr_shape=[16, BLOCK_K // 2, 16])
        ACC_N: gl.constexpr = BLOCK_D // 2 if BLOCK_D // 2 <= 256 else 256
        acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 2],
                                                             instr_shape=[16, ACC_N, 16])
        rows_layout: gl.constexpr = gl.SliceLayout(1, s_layout)
        cols_layout: gl.constexpr = gl.SliceLayout(0, s_layout)
        acc_rows: gl.constexpr = gl.SliceLayout(1, acc_layout)
        acc_cols: gl.constexpr = gl.SliceLayout(0, acc_layout)
        p_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M, BLOCK_K], dtype)

        row0, split, k_begin, k_end, num_tiles = program_range(num_rows, queue_size, split_size, BLOCK_M,
                                                               BLOCK_K)  # num_tiles >= 1 (launch)

        q_smem = gl.allocate_shared_memory(dtype, [BLOCK_M, BLOCK_D], q_desc.layout)
        w_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_K, BLOCK_D], w_desc.layout)
        # OVERLAP_SOFTMAX writes P_{i+1} while P_i W_i runs: two buffers of P.
        P_BUFFERS: gl.constexpr = 2 if OVERLAP_SOFTMAX else 1
        p_smem = gl.allocate_shared_memory(dtype, [P_BUFFERS, BLOCK_M, BLOCK_K], p_layout)
        q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        mbarrier.init(q_bar, count=1)
        for s in gl.static_range(STAGES):
            mbarrier.init(ready.index(s), count=1)
        fence_async_shared()

        # Prologue: q, and the first STAGES tiles, all in flight at once.
        mbarrier.expect(q_bar, q_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(q_desc, [row0, 0], q_bar, q_smem)
        for s in gl.static_range(STAGES):
            if s < num_tiles:
                mbarrier.expect(ready.index(s), w_desc.block_type.nbytes)
                tma.async_copy_global_to_shared(w_desc, [k_begin + s * BLOCK_K, 0], ready.index(s), w_smem.index(s))

        rows = row0 + gl.arange(0, BLOCK_M, layout=rows_layout)
        row_ok = rows < num_rows
        labels = gl.load(labels_ptr + rows, mask=row_ok, other=-1)  # padded rows: -1, never stored
        m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, layout=rows_layout)
        l_i = gl.zeros([BLOCK_M], gl.float32, layout=rows_layout)
        acc = gl.zeros([BLOCK_M, BLOCK_D], gl.float32, layout=acc_layout)
        s_zero = gl.zeros([BLOCK_M, BLOCK_K], gl.float32, layout=s_layout)

        # Tile 0's cosines and softmax.
        mbarrier.wait(q_bar, 0)
        mbarrier.wait(ready.index(0), 0)
        s_tok = warpgroup_mma(q_smem, w_smem.index(0).permute((1, 0)), s_zero, use_acc=False, is_async=True)
        cos = warpgroup_mma_wait(num_outstanding=0, deps=[s_tok])
        m_new, l_i, alpha = _softmax_tile(cos, m_i, l_i, labels, queue_labels_ptr, k_begin, k_end, scale_log2,
                                          interclass_filtering_threshold, p_smem.index(0), FILTER, COMPUTE_GRAD,
                                          BLOCK_K, cols_layout)
        # Every softmax reduces each row's max across the two warpgroups (their
        # column halves), a CTA barrier: no warpgroup writes P_{i+1} before the
        # other has waited for its P_i W_i.
        if not OVERLAP_SOFTMAX:
            for i in range(num_tiles - 1):
                stage = i % STAGES
                nxt = (i + 1) % STAGES
                if COMPUTE_GRAD:
                    acc = _rescaled(acc, alpha, acc_rows, RESCALE_ON_GROWTH)
                    acc_tok = warpgroup_mma(p_smem.index(0), w_smem.index(stage), acc, is_async=True)
                mbarrier.wait(ready.index(nxt), ((i + 1) // STAGES) & 1)
                # use_acc=False: the accumulator's input is ignored; passing the dead
                # cosines of tile i spares the registers of a zero tile.
                s_tok = warpgroup_mma(q_smem, w_smem.index(nxt).permute((1, 0)), cos, use_acc=False,
                                      is_async=True)
                if COMPUTE_GRAD:
                    acc = warpgroup_mma_wait(num_outstanding=1, deps=[acc_tok])
                if i + STAGES < num_tiles:
                    # Each warpgroup waits for its own wgmma: both must be done with
                    # tile i's buffer before one thread's copy overwrites it.
                    _cta_barrier()  # tile i's buffer is free: tile i + STAGES into it
                    mbarrier.expect(ready.index(stage), w_desc.block_type.nbytes)
                    tma.async_copy_global_to_shared(w_desc, [k_begin + (i + STAGES) * BLOCK_K, 0], ready.index(stage),
                                                    w_smem.index(stage))
                cos = warpgroup_mma_wait(num_outstanding=0, deps=[s_tok])
                m_i = m_new
                m_new, l_i, alpha = _softmax_tile(cos, m_i, l_i, labels, queue_labels_ptr, k_begin + (i + 1) * BLOCK_K,
                                                  k_end, scale_log2, interclass_filtering_threshold, p_smem.index(0),
                                                  FILTER, COMPUTE_GRAD, BLOCK_K, cols_layout)
        else:
            # FA3's order instead: the softmax of tile i + 1 runs while P_i W_i is on
            # the tensor cores; the load of tile i + 2 waits for P_i W_i, so it is
            # issued at the end of iteration i, just before S_{i+2} needs it.
            for i in range(num_tiles - 1):
                stage = i % STAGES
                nxt = (i + 1) % STAGES
                if COMPUTE_GRAD:
                    acc = _rescaled(acc, alpha, acc_rows, RESCALE_ON_GROWTH)
                mbarrier.wait(ready.index(nxt), ((i + 1) // STAGES) & 1)
                s_tok = warpgroup_mma(q_smem, w_smem.index(nxt).permute((1, 0)), cos, use_acc=False,
                                      is_async=True)
                if COMPUTE_GRAD:
                    acc_tok = warpgroup_mma(p_smem.index(i % 2), w_smem.index(stage), acc, is_async=True)
                    cos = warpgroup_mma_wait(num_outstanding=1, deps=[s_tok])
                else:
                    cos = warpgroup_mma_wait(num_outstanding=0, deps=[s_tok])
                m_i = m_new
                m_new, l_i, alpha = _softmax_tile(cos, m_i, l_i, labels, queue_labels_ptr, k_begin + (i + 1) * BLOCK_K,
                                                  k_end, scale_log2, interclass_filtering_threshold,
                                                  p_smem.index((i + 1) % 2), FILTER, COMPUTE_GRAD, BLOCK_K,
                                                  cols_layout)
                if COMPUTE_GRAD:
                    acc = warpgroup_mma_wait(num_outstanding=0, deps=[acc_tok])
                if i + STAGES < num_tiles:
                    _cta_barrier()  # both warpgroups done with tile i's buffer
                    mbarrier.expect(ready.index(stage), w_desc.block_type.nbytes)
                    tma.async_copy_global_to_shared(w_desc, [k_begin + (i + STAGES) * BLOCK_K, 0], ready.index(stage),
                                                    w_smem.index(stage))
        # The last tile's second GEMM.
        if COMPUTE_GRAD:
            acc = _rescaled(acc, alpha, acc_rows, RESCALE_ON_GROWTH)
            acc_tok = warpgroup_mma(p_smem.index((num_tiles - 1) % P_BUFFERS), w_smem.index((num_tiles - 1) % STAGES),
                                    acc, is_async=True)
            acc = warpgroup_mma_wait(num_outstanding=0, deps=[acc_tok])
        m_i = m_new
        mbarrier.invalidate(q_bar)
        for s in gl.static_range(STAGES):
            mbarrier.invalidate(ready.index(s))

        # The workspace, as queue_pass_kernel writes it (a non-finite accumulator
        # with a finite sum marks the row for repair_kernel).
        if COMPUTE_GRAD:
            acc_finite = gl.min(gl.where(acc - acc == 0.0, 1, 0), axis=1) == 1
            m_i = gl.where((l_i - l_i == 0.0) & ~gl.convert_layout(acc_finite, rows_layout), float("nan"), m_i)
        ws = rows.to(gl.int64) * num_splits + split  # workspace layout [N, S(, D)]
        gl.store(max_ws_ptr + ws, m_i, mask=row_ok)
        gl.store(sum_ws_ptr + ws, l_i, mask=row_ok)
        if COMPUTE_GRAD:
            acc_rows_idx = row0 + gl.arange(0, BLOCK_M, layout=acc_rows)
            cols = gl.arange(0, BLOCK_D, layout=acc_cols)
            ws_acc = acc_rows_idx.to(gl.int64) * num_splits + split
            gl.store(acc_ws_ptr + ws_acc[:, None] * dim + cols[None, :], acc,
                     mask=(acc_rows_idx < num_rows)[:, None] & (cols < dim)[None, :])
