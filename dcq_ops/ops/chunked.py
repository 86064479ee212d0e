"""The chunked backend's op, dcq_ops::margin_cross_entropy (C++/CUDA kernels in
csrc/): its fake kernel (for torch.compile and opcheck) and its autograd."""

from __future__ import annotations

import torch

from dcq_ops._extension import extension_loaded
from dcq_ops.ops.fused_autograd import fused_fake, register_fused_autograd

# Chunk of the queue per GEMM; 0 lets the kernel choose (csrc/margin_ce.cpp).
DEFAULT_CHUNK_SIZE = 0

if extension_loaded():

    @torch.library.register_fake("dcq_ops::margin_cross_entropy")
    def _margin_cross_entropy_fake(
        embeddings, class_weights, labels, queue_weights, queue_labels,
        scale, m1, m2, m3, filter_threshold, straight_through, compute_grad, chunk_size,
    ):
        return fused_fake(embeddings, compute_grad)

    register_fused_autograd("dcq_ops::margin_cross_entropy", num_inputs=13)


def margin_cross_entropy_chunked(embeddings, class_weights, labels, queue_weights, queue_labels, scale, m1, m2, m3,
                                 filter_threshold, straight_through, compute_grad, chunk_size=DEFAULT_CHUNK_SIZE):
    """(loss per row fp32 [N], d loss_row / d embeddings [N, D] or [0, D])."""
    return torch.ops.dcq_ops.margin_cross_entropy(
        embeddings, class_weights, labels, queue_weights, queue_labels, scale, m1, m2, m3,
        filter_threshold, straight_through, compute_grad, chunk_size)
