"""The launch of the seesaw sm_90 queue pass (16-bit operands; the kernel is
dcq_ops.triton.hopper_seesaw_kernel, its algorithm said there): its tile, the ring
of queue buffers a D allows (``stages``), whether tiles load in two halves of D
(``halves``) and the queue descriptor that follows (``queue_descriptor``), its warps
and register cap (``launch``).

Shared memory at 64 x 64 tiles, D = 512, bf16: q 64 KiB + 2 queue buffers 128 KiB
+ 2 P buffers 16 KiB + the handed statistics and barriers: 210 KiB of the 227.
A third buffer does not fit beside q: one load in flight. At D = 256: q 32 KiB + 4
buffers 128 KiB + the rest: 179 KiB.

Requirements of the launch (dcq_ops.triton.hopper_launch.RULES["seesaw"] holds them):
those of dcq_ops.triton.hopper (16-bit operands, the same host descriptors,
dcq_ops.triton.hopper_launch.gluon_descriptors; the split size a multiple of BLOCK_K; D a
multiple of 8), BLOCK_M = BLOCK_K = 64 (one warpgroup's m64 rows; q shares the queue
tiles' buffer array), BLOCK_D from MIN_BLOCK_D to MAX_BLOCK_D (the halves of D are
wgmma N of 32 to 256; compiled without spills at each), STAGES = ``stages(BLOCK_D)``,
num_warps=NUM_WARPS (the default partition; 8 warps in all), maxnreg=MAXNREG: ``launch``.
"""

from __future__ import annotations

from dcq_ops.triton import hopper

# The kernel's warps: the default partition (consumer 0) runs NUM_WARPS, the
# worker partition (consumer 1) 4 more: two warpgroups, no producer warp. The
# launch caps registers at MAXNREG (Triton's default for a warp-specialized kernel,
# 256, is above ptxas's 255 and ignored with a warning); the worker asks for
# hopper_seesaw_kernel.CONSUMER_REGS, the default partition keeps the rest.
NUM_WARPS = 4
MAXNREG = 255
# The ring of queue-tile buffers: tile t in buffer t % STAGES; at least one per
# consumer, at most MAX_STAGES (three loads in flight are plenty), as many as fit
# beside q in SHARED_LIMIT (``stages``).
MIN_STAGES = 2
MAX_STAGES = 4
# sm_90's opt-in shared memory a block (227 KiB), less what Triton may add.
SHARED_LIMIT = 227 * 1024 - 1024
# The tile: one warpgroup's rows, and q in the queue tiles' buffer array (BLOCK_M = BLOCK_K).
BLOCK_M = 64
BLOCK_K = 64
# The padded D it is launched with (each consumer's half, 32 to 256, is one wgmma's N).
MIN_BLOCK_D = 64
MAX_BLOCK_D = 512


def shared_bytes(block_d: int, stages: int, element_bytes: int = 2) -> int:
    """The kernel's shared memory at a padded D and ring depth: q and the STAGES
    queue buffers (BLOCK_M = BLOCK_K rows of BLOCK_D), the two P buffers, the handed
    statistics and the finiteness flags (``seesaw_queue_pass_kernel``'s allocations)."""
    return ((stages + 1) * BLOCK_K * block_d + 2 * BLOCK_M * BLOCK_K) * element_bytes + (8 + 2) * BLOCK_M * 4


def stages(block_d: int, element_bytes: int = 2) -> int:
    """The ring depth the launch uses at a padded D: the most buffers from MIN_STAGES
    to MAX_STAGES that fit in SHARED_LIMIT (2 at 512, 4 at 256 and below, 16-bit)."""
    fits = [s for s in range(MIN_STAGES, MAX_STAGES + 1) if shared_bytes(block_d, s, element_bytes) <= SHARED_LIMIT]
    return max(fits, default=MIN_STAGES)


def halves(stages: int) -> int:
    """The pieces of D a queue tile is loaded in: 2 with a ring of 2 buffers (D = 512,
    where the loads show), each half completing on its own barrier, so that S_t starts
    on the first half and is issued in two halves around P_{t-1} W_{t-1}, releasing
    tile t - 1 a half sooner (benchmarks/seesaw_schedule.py: 64% -> 76% of peak at its
    central rates); else 1, S_t in one chain under the other consumer's softmax."""
    return 2 if stages == 2 else 1


def load_block(block_d: int, element_bytes: int = 2) -> list:
    """The block of the queue's descriptor that the kernel loads at a padded D: a tile's
    rows by D, or by half of D (``halves``)."""
    return [BLOCK_K, block_d // halves(stages(block_d, element_bytes))]


def queue_descriptor(w_desc):
    """The queue's descriptor the kernel loads from, made from the launcher's (blocks of a
    tile's rows by the padded D): the same, or the same queue in half-width blocks
    (``load_block``) with the same layout (the NVMMA swizzle of a block 64 or more
    elements wide does not depend on its width)."""
    block = load_block(w_desc.block_shape[1], w_desc.base.element_size())
    if block == list(w_desc.block_shape):
        return w_desc
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    return TensorDescriptor(w_desc.base, list(w_desc.shape), list(w_desc.strides), block, w_desc.layout)


def launch(grid, q_desc, w_desc, labels, queue_labels, workspace, scalars, *, filtering: bool, compute_grad: bool,
           rescale_on_growth: bool) -> None:
    """The seesaw queue pass over ``grid`` into ``workspace`` (max, sum, accumulator), on
    the host descriptors of dcq_ops.triton.hopper_launch.gluon_descriptors and the
    scalars of queue_pass_kernel (rows, queue size, D, splits, split size, scale in log2
    units, filtering threshold), with its ring depth (``stages``), warps and register cap."""
    block_d, element_bytes = w_desc.block_shape[1], w_desc.base.element_size()
    seesaw_queue_pass_kernel[grid](q_desc, queue_descriptor(w_desc), labels, queue_labels, *workspace, *scalars,
                                   FILTER=filtering,
                                   COMPUTE_GRAD=compute_grad, RESCALE_ON_GROWTH=rescale_on_growth,
                                   STAGES=stages(block_d, element_bytes), num_warps=NUM_WARPS, maxnreg=MAXNREG)


if hopper.AVAILABLE:
    # launch() looks the kernel up here at each call (tests record launches by replacing it).
    from dcq_ops.triton.hopper_seesaw_kernel import seesaw_queue_pass_kernel  # noqa: F401
