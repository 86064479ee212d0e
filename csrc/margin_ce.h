// The chunked backend of the DCQ margin cross-entropy: a device-generic driver
// (margin_ce.cpp) that walks the queue in chunks, runs each chunk's GEMMs
// through ATen, and calls a fused per-device epilogue (cpu/, cuda/).
#pragma once

#include <ATen/ATen.h>

#include "common/margin.h"

namespace dcq_ops {

// Forward of DESIGN.md §2 with the gradient computed in the same pass:
// returns (loss per row [N] fp32, d loss_i / d embeddings_i [N, D] fp32, or an
// empty [0, D] tensor when compute_grad is false).
std::tuple<at::Tensor, at::Tensor> margin_cross_entropy(
    const at::Tensor& embeddings, const at::Tensor& class_weights, const at::Tensor& labels,
    const at::Tensor& queue_weights, const at::Tensor& queue_labels, double scale, double m1, double m2,
    double m3, double filter_threshold, bool straight_through, bool compute_grad, int64_t chunk_size);

// Epilogue of one queue chunk. `logits` [N, C] fp32 holds the cosines q_i·W_j
// on entry and, on exit, exp(z_ij - new_max_i) for the entries that carry a
// gradient (0 for excluded and filtered ones). row_max/row_sum [N] hold the
// online log-sum-exp state and are updated; rescale [N] receives
// exp(old_max - new_max), by which the gradient accumulator must be scaled.
void chunk_epilogue_cpu(at::Tensor& logits, const at::Tensor& labels, const at::Tensor& chunk_labels,
                        at::Tensor& row_max, at::Tensor& row_sum, at::Tensor& rescale, const MarginParams& p);
// Per row: loss, coefficient of w_i and coefficient of the accumulator.
void finalize_rows_cpu(const at::Tensor& positive_cos, const at::Tensor& row_max, const at::Tensor& row_sum,
                       at::Tensor& loss, at::Tensor& coef_positive, at::Tensor& coef_negative,
                       const MarginParams& p);

#ifdef WITH_CUDA
void chunk_epilogue_cuda(at::Tensor& logits, const at::Tensor& labels, const at::Tensor& chunk_labels,
                         at::Tensor& row_max, at::Tensor& row_sum, at::Tensor& rescale, const MarginParams& p);
void finalize_rows_cuda(const at::Tensor& positive_cos, const at::Tensor& row_max, const at::Tensor& row_sum,
                        at::Tensor& loss, at::Tensor& coef_positive, at::Tensor& coef_negative,
                        const MarginParams& p);
#endif

}  // namespace dcq_ops
