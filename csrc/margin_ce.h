// The chunked backend of the DCQ loss, as the loss algebra of docs/loss.md:
//
//   partials(rows, a slice of the queue) -> (row_max, row_sum, accumulator)
//   finalize(rows, class weights, merged partials) -> (loss rows, gradient rows)
//   dcq_cross_entropy = partials over the whole queue, then finalize.
//
// margin_ce.cpp holds the device-generic parts (argument checks, the O(N*D)
// prologue and projection, dtypes); cpu/ and cuda/ walk the queue (GEMMs and
// the fused epilogue) and finalise rows on their device.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

#include "common/margin.h"

namespace dcq_ops {

// The partials of every row over a slice of the queue (docs/loss.md):
// row_max [N] (natural-log units, -inf where nothing was kept), row_sum [N]
// and, with compute_grad, the accumulator [N, D] = sum_j exp(z_ij - row_max) W_j
// over the entries that carry a gradient. All in the accumulation dtype.
struct Partials {
  at::Tensor row_max;
  at::Tensor row_sum;
  at::Tensor accumulator;  // undefined without compute_grad
};

// What a device driver is given: the normalised rows q [N, D] in the
// accumulation dtype, already rounded through the GEMM operand dtype (so that
// a CPU run of 16-bit operands computes what the tensor cores compute), and
// the operand dtype itself (the queue's dtype, or float64).
struct QueuePass {
  at::Tensor q;
  at::Tensor labels;        // int64 [N], contiguous
  at::Tensor queue_weights; // [K, D], contiguous, any float dtype
  at::Tensor queue_labels;  // int64 [K], contiguous
  at::ScalarType gemm_dtype;
  bool compute_grad;        // the accumulator too (the gradient needs it)
  int64_t chunk_size;       // queue entries per GEMM; 0 = the driver's choice
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> dcq_cross_entropy_partials(
    const at::Tensor& embeddings, const at::Tensor& labels, const at::Tensor& queue_weights,
    const at::Tensor& queue_labels, double scale, double interclass_filtering_threshold, bool compute_grad,
    int64_t chunk_size);

std::tuple<at::Tensor, at::Tensor> dcq_cross_entropy_finalize(
    const at::Tensor& embeddings, const at::Tensor& class_weights, const at::Tensor& row_max,
    const at::Tensor& row_sum, const at::Tensor& accumulator, double scale, double m1, double m2, double m3,
    bool straight_through_margin, bool compute_grad);

std::tuple<at::Tensor, at::Tensor> dcq_cross_entropy(
    const at::Tensor& embeddings, const at::Tensor& class_weights, const at::Tensor& labels,
    const at::Tensor& queue_weights, const at::Tensor& queue_labels, double scale, double m1, double m2,
    double m3, double interclass_filtering_threshold, bool straight_through_margin, bool compute_grad,
    int64_t chunk_size);

// Device drivers.
Partials queue_pass_cpu(const QueuePass& pass, const MarginParams& params);
void finalize_rows_cpu(const at::Tensor& positive_cos, const at::Tensor& row_max, const at::Tensor& row_sum,
                       at::Tensor& loss, at::Tensor& coef_positive, at::Tensor& coef_negative,
                       const MarginParams& params);
#ifdef WITH_CUDA
Partials queue_pass_cuda(const QueuePass& pass, const MarginParams& params);
void finalize_rows_cuda(const at::Tensor& positive_cos, const at::Tensor& row_max, const at::Tensor& row_sum,
                        at::Tensor& loss, at::Tensor& coef_positive, at::Tensor& coef_negative,
                        const MarginParams& params);
#endif

}  // namespace dcq_ops
