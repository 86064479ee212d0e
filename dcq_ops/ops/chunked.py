"""The chunked backend's ops (C++/CUDA kernels in csrc/): the loss algebra's
``dcq_cross_entropy_partials`` and ``dcq_cross_entropy_finalize``, and their
composition ``dcq_cross_entropy`` with its autograd; a wrapper named as each op,
and fake kernels for all three, so that torch.compile traces them and opcheck
passes."""

from __future__ import annotations

import torch

from dcq_ops._extension import extension_loaded
from dcq_ops.downgrades import note_chunked_gemm
from dcq_ops.ops.fused_autograd import accumulation_dtype, fused_fake, register_fused_autograd

# Queue entries per GEMM; 0 lets the kernel choose (from the CPU's L2 cache, or
# the GPU's L2 and a workspace bound: csrc/cpu/queue_pass.cpp, csrc/cuda/queue_pass.cu).
DEFAULT_CHUNK_SIZE = 0

if extension_loaded():

    @torch.library.register_fake("dcq_ops::dcq_cross_entropy")
    def _dcq_cross_entropy_fake(
        embeddings, class_weights, labels, queue_weights, queue_labels,
        scale, m1, m2, m3, interclass_filtering_threshold, straight_through_margin, compute_grad, chunk_size,
    ):
        return fused_fake(embeddings, compute_grad, accumulation_dtype(embeddings, class_weights, queue_weights))

    register_fused_autograd("dcq_ops::dcq_cross_entropy", num_inputs=13)

    @torch.library.register_fake("dcq_ops::dcq_cross_entropy_partials")
    def _dcq_cross_entropy_partials_fake(embeddings, labels, queue_weights, queue_labels, scale,
                                         interclass_filtering_threshold, compute_grad, chunk_size):
        rows, dim = embeddings.shape
        dtype = accumulation_dtype(embeddings, queue_weights)
        return (embeddings.new_empty((rows,), dtype=dtype), embeddings.new_empty((rows,), dtype=dtype),
                embeddings.new_empty((rows if compute_grad else 0, dim), dtype=dtype))

    @torch.library.register_fake("dcq_ops::dcq_cross_entropy_finalize")
    def _dcq_cross_entropy_finalize_fake(embeddings, class_weights, row_max, row_sum, accumulator, scale, m1, m2, m3,
                                         straight_through_margin, compute_grad):
        return fused_fake(embeddings, compute_grad, accumulation_dtype(embeddings, class_weights, row_sum))


def _gemm_dtype(embeddings, queue_weights) -> torch.dtype:
    """The GEMMs' operand dtype (csrc/margin_ce.cpp, partials_of): the queue's, float64 for float64 rows."""
    return torch.float64 if embeddings.dtype == torch.float64 else queue_weights.dtype


def dcq_cross_entropy(embeddings, class_weights, labels, queue_weights, queue_labels, scale, m1, m2, m3,
                      interclass_filtering_threshold, straight_through_margin, compute_grad,
                      chunk_size=DEFAULT_CHUNK_SIZE):
    """``dcq_ops::dcq_cross_entropy``: (loss per row [N], d loss_row / d embeddings [N, D], or
    [0, D] when ``compute_grad`` is false), in fp32 (fp64 for float64 inputs)."""
    note_chunked_gemm(queue_weights.device, _gemm_dtype(embeddings, queue_weights))
    return torch.ops.dcq_ops.dcq_cross_entropy(
        embeddings, class_weights, labels, queue_weights, queue_labels, scale, m1, m2, m3,
        interclass_filtering_threshold, straight_through_margin, compute_grad, chunk_size)


def dcq_cross_entropy_partials(embeddings, labels, queue_weights, queue_labels, scale, interclass_filtering_threshold,
                               compute_grad, chunk_size=DEFAULT_CHUNK_SIZE):
    """``dcq_ops::dcq_cross_entropy_partials``: (row_max [N], row_sum [N], accumulator [N, D], or
    [0, D] when ``compute_grad`` is false) of every row over this queue slice."""
    note_chunked_gemm(queue_weights.device, _gemm_dtype(embeddings, queue_weights))
    return torch.ops.dcq_ops.dcq_cross_entropy_partials(
        embeddings, labels, queue_weights, queue_labels, scale, interclass_filtering_threshold, compute_grad,
        chunk_size)


def dcq_cross_entropy_finalize(embeddings, class_weights, row_max, row_sum, accumulator, scale, m1, m2, m3,
                               straight_through_margin, compute_grad):
    """``dcq_ops::dcq_cross_entropy_finalize``: (loss per row [N], gradient rows [N, D] or [0, D])
    from the merged partials of every row."""
    return torch.ops.dcq_ops.dcq_cross_entropy_finalize(
        embeddings, class_weights, row_max, row_sum, accumulator, scale, m1, m2, m3, straight_through_margin,
        compute_grad)


# ----------------------------------------------------------------------------
# The backend table's entry points (dcq_ops.backends): the ops with a MarginConfig.


def _compute_grad(embeddings: torch.Tensor) -> bool:
    return embeddings.requires_grad and torch.is_grad_enabled()


def loss_rows(embeddings, class_weights, labels, queue_weights, queue_labels, margin) -> torch.Tensor:
    """The loss of every row [N], differentiable with respect to ``embeddings`` (its gradient
    is computed in the same pass when they require one)."""
    rows, _ = dcq_cross_entropy(
        embeddings, class_weights, labels, queue_weights, queue_labels, margin.scale, margin.m1, margin.m2,
        margin.m3, margin.interclass_filtering_threshold, margin.straight_through_margin, _compute_grad(embeddings))
    return rows


def partials(embeddings, labels, queue_weights, queue_labels, margin, compute_grad: bool):
    """(row_max, row_sum, accumulator) of every row over this queue slice."""
    return dcq_cross_entropy_partials(embeddings, labels, queue_weights, queue_labels, margin.scale,
                                      margin.interclass_filtering_threshold, compute_grad)


def finalize(embeddings, class_weights, row_max, row_sum, accumulator, margin, compute_grad: bool):
    """(loss rows, gradient rows) from the merged partials of every row."""
    return dcq_cross_entropy_finalize(embeddings, class_weights, row_max, row_sum, accumulator, margin.scale,
                                      margin.m1, margin.m2, margin.m3, margin.straight_through_margin, compute_grad)
