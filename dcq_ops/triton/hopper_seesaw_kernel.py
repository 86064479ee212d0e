"""The seesaw sm_90 queue pass (16-bit operands), in Gluon: the partials of
dcq_ops.triton.kernels.queue_pass_kernel from two consumer warpgroups that take
the tiles in turn (FlashMLA's schedule), each a partition of ``gl.warp_specialize``.

Why: in dcq_ops.triton.hopper the two warpgroups split every tile's columns, so
each tile's softmax meets across them at every row max (CTA barriers) and its
first GEMM (``m64n32k16``, q and W both from shared memory) is bound by shared
memory at 1.5x its ideal. Here each consumer warpgroup owns every other tile
whole:

- warpgroup ``p`` computes S_t = q W_t^T for the tiles t = p, p + 2, ...
  (``m64n64k16``, 1,024 tensor-core clocks a tile, its ideal) and the online
  softmax of the whole tile: the row max and sum it starts from, m_{t-1} and
  l_{t-1}, are the other warpgroup's, handed over in shared memory, so the chain
  of (m, l) runs from tile to tile in the classic order;
- it hands m_t, l_t, alpha_t and P_t to the other warpgroup (shared memory, an
  mbarrier), and both accumulate acc += P_t W_t in tile order, each over its half
  of D (``m64n256k16``), after rescaling by alpha_t (only when some row's max
  grew, with RESCALE_ON_GROWTH);
- so one warpgroup's softmax runs while the other's GEMMs occupy the tensor
  cores (the ping-pong), with no reduction across warpgroups;
- the queue tiles pass through a ring of STAGES buffers (tile t in buffer
  t % STAGES): the consumer that does not own tile t issues the TMA of tile
  t + STAGES into its buffer once both are done with tile t (its own half of
  P_t W_t waited for, the owner's released on an mbarrier); the owner issued its
  P_t W_t first, so the loader rarely waits, and the owner goes on to its next tile
  without waiting for the load. A producer warp would issue it at the same moment,
  and its warpgroup's registers would come out of the consumers'.

Per own tile a consumer's loop: wait for its tile, issue S_t; wait for tile
t - 1's hand-over, rescale, issue P_{t-1} W_{t-1}; wait for both (2 wgmma waits
a tile in all), and once tile t - 1's owner has released it, load tile
t - 1 + STAGES; softmax of t, hand it over; rescale, P_t W_t, wait; release tile t.

How far ahead the loads run (hopper_seesaw.stages): with STAGES = 2 (D = 512, where a third
buffer does not fit beside q) a consumer's next tile is loaded while it finishes
the current one, and one load is in flight, covered by what the other consumer
does meanwhile. There the tiles arrive in two halves of D (hopper_seesaw.halves), each on its
own barrier, and S_t is issued in two halves around P_{t-1} W_{t-1}: the first as
soon as the first half of tile t is in, the second behind P_{t-1} W_{t-1}, so tile
t - 1 is released (its next load issued) while S_t's second half runs. The products
are the same k-steps in the same order as one chain. With STAGES = 4 (a padded D
up to 256) tile t + 4 is loaded while tiles t + 1 to t + 3 are in the ring: up to
three loads in flight, each issued before the MMAs of the tiles before it, and S_t
is one chain under the other consumer's softmax. benchmarks/seesaw_schedule.py
runs this protocol (its barriers with the hardware's parity rule) and estimates its
clocks.

The algebra is kernels._block_partials', operation for operation: the same
(m, l) recurrence per tile in tile order, the same rescale-then-accumulate of the
accumulator per tile; so the plain-Triton twin (dcq_ops.triton.hopper_twin) is
the algebra of this kernel too. Gluon has no interpreter: the twin's bits, the
GPU's first-contact check and dcq_ops.check stand for it. It has never run on a
GPU: it is the first of the sm_90 default's ranked kernels, each new class of its
launches first run in a child process (dcq_ops.triton.hopper_launch, .hopper_probe);
benchmarks/hopper_sass.py compiles it.

Its launch (tile, ring depth, descriptors, warps and register cap) is
dcq_ops.triton.hopper_seesaw's.
"""

from __future__ import annotations

from dcq_ops.triton import hopper

# Registers the worker partition (consumer 1) asks for; the default partition keeps
# the rest of dcq_ops.triton.hopper_seesaw.MAXNREG's share (248): 64,512 of the 65,536.
CONSUMER_REGS = 256

if hopper.AVAILABLE:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma,
                                                                  warpgroup_mma, warpgroup_mma_wait)

    # The partition-wide barrier: gl.thread_barrier in Triton 3.6, gl.barrier in 3.8.
    _barrier = gl.barrier if hasattr(gl, "barrier") else gl.thread_barrier
    _CONSUMER_REGS = gl.constexpr(CONSUMER_REGS)

    # The program's rows, split and queue range: the pipelined kernel's.
    _program = hopper.program_range

    # The online log-sum-exp step of a whole tile, the pipelined kernel's (m, l, alpha, P).
    _softmax_rows = hopper.softmax_rows

    @gluon.jit
    def _load_tile(w_desc, w_smem, ready, t, k_begin, BLOCK_K: gl.constexpr, STAGES: gl.constexpr):
        """Queue tile t into buffer t % STAGES, completing on ready[t % STAGES]; with two
        halves of D (``w_desc``'s block half the buffer's width), the second half on
        ready[STAGES + t % STAGES]."""
        LOAD_D: gl.constexpr = w_desc.block_type.shape[1]
        if LOAD_D == w_smem.shape[2]:
            mbarrier.expect(ready.index(t % STAGES), w_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(w_desc, [k_begin + t * BLOCK_K, 0], ready.index(t % STAGES),
                                            w_smem.index(t % STAGES))
        else:
            for h in gl.static_range(2):
                mbarrier.expect(ready.index(h * STAGES + t % STAGES), w_desc.block_type.nbytes)
                tma.async_copy_global_to_shared(w_desc, [k_begin + t * BLOCK_K, h * LOAD_D],
                                                ready.index(h * STAGES + t % STAGES),
                                                w_smem.index(t % STAGES).slice(h * LOAD_D, LOAD_D, dim=1))

    @gluon.jit
    def _hand_over(p, m_new, l_i, alpha, p_slot, stats, SLOT: gl.constexpr, handoff_bar, COMPUTE_GRAD: gl.constexpr):
        """Tile t's (m, l, alpha) and P into this consumer's slot for the other one
        (free: the other consumer handed tile t - 1 over, which this one waited for,
        only after its P_{t-2} W_{t-2} and its reads of tile t - 2's statistics)."""
        BLOCK_M: gl.constexpr = m_new.shape[0]
        stats.slice((4 * SLOT) * BLOCK_M, BLOCK_M).store(m_new)
        stats.slice((4 * SLOT + 1) * BLOCK_M, BLOCK_M).store(l_i)
        stats.slice((4 * SLOT + 2) * BLOCK_M, BLOCK_M).store(alpha)
        if COMPUTE_GRAD:
            p_slot.store(p.to(p_slot.dtype))
            # P is written by ordinary stores and read by the tensor cores (the async proxy).
            fence_async_shared()
        _barrier()  # every thread's stores before the one arrive
        mbarrier.arrive(handoff_bar, count=1)

    @gluon.jit
    def _other_tile(acc, stats, SLOT: gl.constexpr, p_slot, w_half, rows_layout: gl.constexpr,
                    acc_rows: gl.constexpr, COMPUTE_GRAD: gl.constexpr, RESCALE_ON_GROWTH: gl.constexpr):
        """The other consumer's tile t - 1 as handed over: its (m, l), and with the
        gradient this consumer's half of acc rescaled and P W issued (async; the
        first value returned is then its pending accumulator)."""
        BLOCK_M: gl.constexpr = acc.shape[0]
        m_i = stats.slice((4 * SLOT) * BLOCK_M, BLOCK_M).load(rows_layout)
        l_i = stats.slice((4 * SLOT + 1) * BLOCK_M, BLOCK_M).load(rows_layout)
        if COMPUTE_GRAD:
            alpha = stats.slice((4 * SLOT + 2) * BLOCK_M, BLOCK_M).load(acc_rows)
            acc = hopper._rescaled(acc, alpha, acc_rows, RESCALE_ON_GROWTH)
            pending = warpgroup_mma(p_slot, w_half, acc, is_async=True)
        else:
            pending = acc
        return pending, m_i, l_i

    @gluon.jit
    def _own_tile_end(acc, alpha, p_slot, w_half, released, t, acc_rows: gl.constexpr, COMPUTE_GRAD: gl.constexpr,
                      RESCALE_ON_GROWTH: gl.constexpr, STAGES: gl.constexpr):
        """After tile t's softmax: this consumer's half of P_t W_t, then tile t released
        to the other consumer, which loads tile t + STAGES into its buffer
        (``_load_after``)."""
        if COMPUTE_GRAD:
            acc = hopper._rescaled(acc, gl.convert_layout(alpha, acc_rows), acc_rows, RESCALE_ON_GROWTH)
            pv_tok = warpgroup_mma(p_slot, w_half, acc, is_async=True)
            acc = warpgroup_mma_wait(num_outstanding=0, deps=[pv_tok])
        _barrier()  # every warp of this warpgroup done with tile t
        mbarrier.arrive(released.index(t % STAGES), count=1)
        return acc

    @gluon.jit
    def _load_after(w_desc, w_smem, ready, released, t, num_tiles, k_begin, STAGES: gl.constexpr):
        """The other consumer's tile t done here (every warp of this warpgroup past its
        wait): once its owner has released it too, tile t + STAGES into its buffer.
        The load is issued by the consumer that finishes a tile second as a rule (the
        owner's P_t W_t is issued first), so the owner goes on to its next tile without
        waiting for it."""
        BLOCK_K: gl.constexpr = w_smem.shape[1]
        if t + STAGES < num_tiles:
            # Buffer t % STAGES's (t // STAGES)-th release.
            mbarrier.wait(released.index(t % STAGES), (t // STAGES) & 1)
            _load_tile(w_desc, w_smem, ready, t + STAGES, k_begin, BLOCK_K, STAGES)

    @gluon.jit
    def _consumer(w_desc, q_smem, w_smem, p_smem, stats, finite, q_bar, ready, released, handoff, done,
                  labels_ptr, queue_labels_ptr, max_ws_ptr, sum_ws_ptr, acc_ws_ptr,
                  num_rows, queue_size, dim, num_splits, split_size, scale_log2, interclass_filtering_threshold,
                  FILTER: gl.constexpr, COMPUTE_GRAD: gl.constexpr, RESCALE_ON_GROWTH: gl.constexpr,
                  STAGES: gl.constexpr, PARITY: gl.constexpr):
        """Consumer warpgroup PARITY: the S GEMM and softmax of tiles PARITY,
        PARITY + 2, ..., and the loads STAGES tiles after each; P W of every tile over its half of D; its
        half of the accumulator to the workspace, and (consumer 0) the row max and
        sum."""
        BLOCK_M: gl.constexpr = q_smem.shape[0]
        BLOCK_D: gl.constexpr = q_smem.shape[1]
        BLOCK_K: gl.constexpr = w_smem.shape[1]
        HALF: gl.constexpr = BLOCK_D // 2
        OTHER: gl.constexpr = 1 - PARITY
        # The tiles arrive in two halves of D (hopper_seesaw.halves): S_t is then issued in two
        # halves around P_{t-1} W_{t-1}, which releases tile t - 1 a half sooner.
        SPLIT_S: gl.constexpr = w_desc.block_type.shape[1] != BLOCK_D
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, BLOCK_K, 16])
        acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                             instr_shape=[16, HALF, 16])
        rows_layout: gl.constexpr = gl.SliceLayout(1, s_layout)
        cols_layout: gl.constexpr = gl.SliceLayout(0, s_layout)
        acc_rows: gl.constexpr = gl.SliceLayout(1, acc_layout)
        acc_cols: gl.constexpr = gl.SliceLayout(0, acc_layout)

        row0, split, k_begin, k_end, num_tiles = _program(num_rows, queue_size, split_size, BLOCK_M, BLOCK_K)
        rows = row0 + gl.arange(0, BLOCK_M, layout=rows_layout)
        row_ok = rows < num_rows
        labels = gl.load(labels_ptr + rows, mask=row_ok, other=-1)  # padded rows: -1, never stored
        m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, layout=rows_layout)
        l_i = gl.zeros([BLOCK_M], gl.float32, layout=rows_layout)
        acc = gl.zeros([BLOCK_M, HALF], gl.float32, layout=acc_layout)
        mbarrier.wait(q_bar, 0)

        if PARITY == 0:
            # Tile 0 has no predecessor: (m, l) start at (-inf, 0).
            mbarrier.wait(ready.index(0), 0)
            if SPLIT_S:
                mbarrier.wait(ready.index(STAGES), 0)
            s_tok = warpgroup_mma(q_smem, w_smem.index(0).permute((1, 0)),
                                  gl.zeros([BLOCK_M, BLOCK_K], gl.float32, layout=s_layout), use_acc=False,
                                  is_async=True)
            cos = warpgroup_mma_wait(num_outstanding=0, deps=[s_tok])
            m_i, l_i, alpha, p = _softmax_rows(cos, m_i, l_i, labels, queue_labels_ptr, k_begin, k_end, scale_log2,
                                               interclass_filtering_threshold, FILTER, BLOCK_K, cols_layout)
            _hand_over(p, m_i, l_i, alpha, p_smem.index(0), stats, 0, handoff.index(0), COMPUTE_GRAD)
            acc = _own_tile_end(acc, alpha, p_smem.index(0), w_smem.index(0).slice(0, HALF, dim=1), released, 0,
                                acc_rows, COMPUTE_GRAD, RESCALE_ON_GROWTH, STAGES)

        own_tiles = (num_tiles - PARITY + 1) // 2
        for j in range(1 - PARITY, own_tiles):
            t = 2 * j + PARITY
            # The buffers by indices the compiler cannot prove constant (zero is 0: t >=
            # 0): with constant ones it hoists every wgmma descriptor (64 bits each; q
            # alone has 32) out of the loop, and they spill.
            zero = (t < 0).to(gl.int32)
            buffer = t % STAGES + zero
            prev_buffer = (t - 1) % STAGES + zero
            tile_w = w_smem.index(buffer)
            prev_w = w_smem.index(prev_buffer)
            q_tile = w_smem.index(STAGES + zero)
            own_p = p_smem.index(PARITY + zero)
            other_p = p_smem.index(OTHER + zero)
            # S_t as soon as its tile is in (buffer t % STAGES's (t // STAGES)-th load);
            # it runs while the other consumer's softmax of t - 1 does.
            mbarrier.wait(ready.index(buffer), (t // STAGES) & 1)
            # use_acc=False ignores the accumulator's input, but a zero tile made once
            # would hold 32 registers for the whole loop: made here, it costs 32 moves.
            zeros = gl.zeros([BLOCK_M, BLOCK_K], gl.float32, layout=s_layout)
            if SPLIT_S:  # the first half of D's k-steps (the same order of products as in one chain)
                s_tok = warpgroup_mma(q_tile.slice(0, HALF, dim=1), tile_w.slice(0, HALF, dim=1).permute((1, 0)),
                                      zeros, use_acc=False, is_async=True)
            else:
                s_tok = warpgroup_mma(q_tile, tile_w.permute((1, 0)), zeros, use_acc=False, is_async=True)
            # Tile t - 1 (the other consumer's, its (j - 1 + PARITY)-th) handed over.
            mbarrier.wait(handoff.index(OTHER), (j - 1 + PARITY) & 1)
            pv_tok, m_i, l_i = _other_tile(acc, stats, OTHER, other_p,
                                           prev_w.slice(PARITY * HALF, HALF, dim=1), rows_layout, acc_rows,
                                           COMPUTE_GRAD, RESCALE_ON_GROWTH)
            if SPLIT_S:
                # The second half of S_t behind P_{t-1} W_{t-1}: tile t - 1 is released
                # (its next load issued) while it runs.
                mbarrier.wait(ready.index(STAGES + buffer), (t // STAGES) & 1)
                s_tok = warpgroup_mma(q_tile.slice(HALF, HALF, dim=1),
                                      tile_w.slice(HALF, HALF, dim=1).permute((1, 0)), s_tok, is_async=True)
                if COMPUTE_GRAD:
                    acc = warpgroup_mma_wait(num_outstanding=1, deps=[pv_tok])
                _barrier()  # every warp's reads of tile t - 1 done
                _load_after(w_desc, w_smem, ready, released, t - 1, num_tiles, k_begin, STAGES)
                cos = warpgroup_mma_wait(num_outstanding=0, deps=[s_tok])
            else:
                # Both done before the softmax: tile t - 1's next load is issued at once, and
                # no accumulator is held by a wgmma in flight while the softmax needs the
                # registers; the tensor cores meanwhile run the other consumer's GEMMs.
                if COMPUTE_GRAD:
                    cos, acc = warpgroup_mma_wait(num_outstanding=0, deps=[s_tok, pv_tok])
                else:
                    cos = warpgroup_mma_wait(num_outstanding=0, deps=[s_tok])
                _barrier()  # every warp's reads of tile t - 1 done
                _load_after(w_desc, w_smem, ready, released, t - 1, num_tiles, k_begin, STAGES)
            m_i, l_i, alpha, p = _softmax_rows(cos, m_i, l_i, labels, queue_labels_ptr, k_begin + t * BLOCK_K,
                                               k_end, scale_log2, interclass_filtering_threshold, FILTER, BLOCK_K,
                                               cols_layout)
            _hand_over(p, m_i, l_i, alpha, own_p, stats, PARITY, handoff.index(PARITY),
                       COMPUTE_GRAD)
            acc = _own_tile_end(acc, alpha, own_p, tile_w.slice(PARITY * HALF, HALF, dim=1), released, t, acc_rows,
                                COMPUTE_GRAD, RESCALE_ON_GROWTH, STAGES)

        if (num_tiles - 1) % 2 == OTHER:
            # The last tile is the other consumer's: its (m, l), and its P W here.
            mbarrier.wait(handoff.index(OTHER), ((num_tiles - 1) // 2) & 1)
            pv_tok, m_i, l_i = _other_tile(acc, stats, OTHER, p_smem.index(OTHER),
                                           w_smem.index((num_tiles - 1) % STAGES).slice(PARITY * HALF, HALF, dim=1),
                                           rows_layout,
                                           acc_rows, COMPUTE_GRAD, RESCALE_ON_GROWTH)
            if COMPUTE_GRAD:
                acc = warpgroup_mma_wait(num_outstanding=0, deps=[pv_tok])

        # The workspace, as queue_pass_kernel writes it: each consumer its half of
        # the accumulator; consumer 0 the row max (NaN where the sum is finite and
        # either half of the accumulator is not, which marks the row for
        # repair_kernel) and the row sum.
        ws = rows.to(gl.int64) * num_splits + split  # workspace layout [N, S(, D)]
        if COMPUTE_GRAD:
            acc_rows_idx = row0 + gl.arange(0, BLOCK_M, layout=acc_rows)
            cols = PARITY * HALF + gl.arange(0, HALF, layout=acc_cols)
            ws_acc = acc_rows_idx.to(gl.int64) * num_splits + split
            gl.store(acc_ws_ptr + ws_acc[:, None] * dim + cols[None, :], acc,
                     mask=(acc_rows_idx < num_rows)[:, None] & (cols < dim)[None, :])
            # A padded column (past dim) holds 0: it never makes a row non-finite.
            half_finite = gl.min(gl.where(acc - acc == 0.0, 1, 0), axis=1)
            finite.slice(PARITY * BLOCK_M, BLOCK_M).store(gl.convert_layout(half_finite, rows_layout))
            _barrier()
            mbarrier.arrive(done, count=1)
            if PARITY == 0:
                mbarrier.wait(done, 0)
                both = finite.slice(0, BLOCK_M).load(rows_layout) * finite.slice(BLOCK_M, BLOCK_M).load(rows_layout)
                m_i = gl.where((l_i - l_i == 0.0) & (both == 0), float("nan"), m_i)
        if PARITY == 0:
            gl.store(max_ws_ptr + ws, m_i, mask=row_ok)
            gl.store(sum_ws_ptr + ws, l_i, mask=row_ok)

    @gluon.jit
    def seesaw_queue_pass_kernel(
        q_desc, w_desc, labels_ptr, queue_labels_ptr,
        max_ws_ptr, sum_ws_ptr, acc_ws_ptr,
        num_rows, queue_size, dim, num_splits, split_size,
        scale_log2, interclass_filtering_threshold,
        FILTER: gl.constexpr, COMPUTE_GRAD: gl.constexpr, RESCALE_ON_GROWTH: gl.constexpr, STAGES: gl.constexpr,
    ):
        """queue_pass_kernel's program (same grid, same workspace) on the
        descriptors of dcq_ops.triton.hopper.hopper_queue_pass_kernel (the queue's in
        blocks of hopper_seesaw.load_block: hopper_seesaw.queue_descriptor), with a ring of STAGES queue
        buffers, num_warps=NUM_WARPS and maxnreg=MAXNREG."""
        BLOCK_M: gl.constexpr = q_desc.block_type.shape[0]
        BLOCK_D: gl.constexpr = q_desc.block_type.shape[1]
        BLOCK_K: gl.constexpr = w_desc.block_type.shape[0]
        dtype: gl.constexpr = w_desc.dtype
        p_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M, BLOCK_K], dtype)
        plain: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, order=[0])

        # The STAGES queue buffers and q (BLOCK_M = BLOCK_K, the same layout) as one array.
        gl.static_assert(BLOCK_M == BLOCK_K)
        gl.static_assert(STAGES >= 2)
        gl.static_assert((BLOCK_D == w_desc.block_type.shape[1]) | (BLOCK_D == 2 * w_desc.block_type.shape[1]))
        w_smem = gl.allocate_shared_memory(dtype, [STAGES + 1, BLOCK_K, BLOCK_D], q_desc.layout)
        q_smem = w_smem.index(STAGES)
        p_smem = gl.allocate_shared_memory(dtype, [2, BLOCK_M, BLOCK_K], p_layout)
        # Rows 4p, 4p + 1, 4p + 2 of BLOCK_M: consumer p's (m, l, alpha) of its last
        # tile, for the other one (4 rows each: shapes are powers of two).
        stats = gl.allocate_shared_memory(gl.float32, [8 * BLOCK_M], plain)
        finite = gl.allocate_shared_memory(gl.int32, [2 * BLOCK_M], plain)
        q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        done = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        # Per buffer: its tile arrived; the owner of its tile released it (the other
        # consumer then loads the next). Per consumer: it handed its softmax over.
        HALVES: gl.constexpr = BLOCK_D // w_desc.block_type.shape[1]
        ready = gl.allocate_shared_memory(gl.int64, [HALVES * STAGES, 1], mbarrier.MBarrierLayout())
        released = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        handoff = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        mbarrier.init(q_bar, count=1)
        mbarrier.init(done, count=2)
        for s in gl.static_range(STAGES):
            mbarrier.init(released.index(s), count=1)
        for s in gl.static_range(HALVES * STAGES):
            mbarrier.init(ready.index(s), count=1)
        for s in gl.static_range(2):
            mbarrier.init(handoff.index(s), count=1)
        fence_async_shared()

        # q and the first STAGES tiles, in flight before the consumers fork.
        row0, split, k_begin, k_end, num_tiles = _program(num_rows, queue_size, split_size, BLOCK_M, BLOCK_K)
        mbarrier.expect(q_bar, q_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(q_desc, [row0, 0], q_bar, q_smem)
        for s in gl.static_range(STAGES):
            if s < num_tiles:
                _load_tile(w_desc, w_smem, ready, s, k_begin, BLOCK_K, STAGES)

        gl.warp_specialize([
            (_consumer, (w_desc, q_smem, w_smem, p_smem, stats, finite, q_bar, ready, released, handoff, done,
                         labels_ptr, queue_labels_ptr, max_ws_ptr, sum_ws_ptr, acc_ws_ptr, num_rows, queue_size, dim,
                         num_splits, split_size, scale_log2, interclass_filtering_threshold, FILTER, COMPUTE_GRAD,
                         RESCALE_ON_GROWTH, STAGES, 0)),
            (_consumer, (w_desc, q_smem, w_smem, p_smem, stats, finite, q_bar, ready, released, handoff, done,
                         labels_ptr, queue_labels_ptr, max_ws_ptr, sum_ws_ptr, acc_ws_ptr, num_rows, queue_size, dim,
                         num_splits, split_size, scale_log2, interclass_filtering_threshold, FILTER, COMPUTE_GRAD,
                         RESCALE_ON_GROWTH, STAGES, 1)),
        ], [4], [_CONSUMER_REGS])
