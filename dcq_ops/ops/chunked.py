"""The chunked backend's ops (C++/CUDA kernels in csrc/): the loss algebra's
``margin_ce_partials`` and ``margin_ce_finalize``, and their composition
``margin_cross_entropy`` with its autograd; fake kernels for all three, so
that torch.compile traces them and opcheck passes."""

from __future__ import annotations

import torch

from dcq_ops._extension import extension_loaded
from dcq_ops.ops.fused_autograd import accumulation_dtype, fused_fake, register_fused_autograd

# Queue entries per GEMM; 0 lets the kernel choose (from the CPU's L2 cache, or
# the GPU's L2 and a workspace bound: csrc/cpu/queue_pass.cpp, csrc/cuda/queue_pass.cu).
DEFAULT_CHUNK_SIZE = 0

if extension_loaded():

    @torch.library.register_fake("dcq_ops::margin_cross_entropy")
    def _margin_cross_entropy_fake(
        embeddings, class_weights, labels, queue_weights, queue_labels,
        scale, m1, m2, m3, filter_threshold, straight_through, compute_grad, chunk_size,
    ):
        return fused_fake(embeddings, compute_grad, accumulation_dtype(embeddings, class_weights, queue_weights))

    register_fused_autograd("dcq_ops::margin_cross_entropy", num_inputs=13)

    @torch.library.register_fake("dcq_ops::margin_ce_partials")
    def _partials_fake(embeddings, labels, queue_weights, queue_labels, scale, filter_threshold, with_accumulator,
                       chunk_size):
        rows, dim = embeddings.shape
        dtype = accumulation_dtype(embeddings, queue_weights)
        return (embeddings.new_empty((rows,), dtype=dtype), embeddings.new_empty((rows,), dtype=dtype),
                embeddings.new_empty((rows if with_accumulator else 0, dim), dtype=dtype))

    @torch.library.register_fake("dcq_ops::margin_ce_finalize")
    def _finalize_fake(embeddings, class_weights, row_max, row_sum, accumulator, scale, m1, m2, m3,
                       straight_through, compute_grad):
        return fused_fake(embeddings, compute_grad, accumulation_dtype(embeddings, class_weights, row_sum))


def margin_cross_entropy_chunked(embeddings, class_weights, labels, queue_weights, queue_labels, scale, m1, m2, m3,
                                 filter_threshold, straight_through, compute_grad, chunk_size=DEFAULT_CHUNK_SIZE):
    """(loss per row [N], d loss_row / d embeddings [N, D] or [0, D]), in fp32 (fp64 for float64 inputs)."""
    return torch.ops.dcq_ops.margin_cross_entropy(
        embeddings, class_weights, labels, queue_weights, queue_labels, scale, m1, m2, m3,
        filter_threshold, straight_through, compute_grad, chunk_size)
