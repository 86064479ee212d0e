// Device-generic part of the chunked backend: argument checks, the dtype
// policy, the O(N*D) prologue (normalisation) and the projection of the
// gradient through it. The O(N*K*D) work is in the device drivers
// (cpu/queue_pass.cpp, cuda/queue_pass.cu).
//
// Dtypes (docs/loss.md, "Numerics"): everything accumulates in fp32, or in
// fp64 when an input is float64 (then everything is float64: a float64 run
// is exact enough for torch.autograd.gradcheck). Both GEMMs take their
// operands in the queue's dtype (bf16/fp16 -> tensor cores on a GPU).
#include "margin_ce.h"

#include <torch/library.h>

#include <limits>

namespace dcq_ops {
namespace {

void check_rows(const at::Tensor& embeddings, const at::Tensor& labels) {
  TORCH_CHECK(embeddings.dim() == 2, "embeddings must be [N, D], got shape ", embeddings.sizes());
  TORCH_CHECK(at::isFloatingType(embeddings.scalar_type()), "embeddings must be a floating-point tensor, got ",
              embeddings.scalar_type());
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == embeddings.size(0), "labels must be [N] with N = ",
              embeddings.size(0), ", got shape ", labels.sizes());
  TORCH_CHECK(labels.scalar_type() == at::kLong, "labels must be int64, got ", labels.scalar_type());
  TORCH_CHECK(labels.device() == embeddings.device(), "labels must be on ", embeddings.device(), ", got ",
              labels.device());
}

void check_queue(const at::Tensor& embeddings, const at::Tensor& queue_weights, const at::Tensor& queue_labels) {
  TORCH_CHECK(queue_weights.dim() == 2 && queue_weights.size(1) == embeddings.size(1),
              "queue_weights must be [K, D] with D = ", embeddings.size(1), ", got shape ", queue_weights.sizes());
  TORCH_CHECK(at::isFloatingType(queue_weights.scalar_type()), "queue_weights must be a floating-point tensor, got ",
              queue_weights.scalar_type());
  TORCH_CHECK(queue_labels.dim() == 1 && queue_labels.size(0) == queue_weights.size(0),
              "queue_labels must be [K] with K = ", queue_weights.size(0), ", got shape ", queue_labels.sizes());
  TORCH_CHECK(queue_labels.scalar_type() == at::kLong, "queue_labels must be int64, got ",
              queue_labels.scalar_type());
  for (const auto* t : {&queue_weights, &queue_labels}) {
    TORCH_CHECK(t->device() == embeddings.device(), "queue tensors must be on ", embeddings.device(), ", got ",
                t->device());
  }
}

at::ScalarType accumulation_dtype(std::initializer_list<const at::Tensor*> tensors) {
  for (const auto* t : tensors) {
    if (t->defined() && t->scalar_type() == at::kDouble) return at::kDouble;
  }
  return at::kFloat;
}

// The rows normalised in the accumulation dtype, q = x / max(||x||, 1e-12), and
// what the gradient's projection needs of ||x||, in units of the row's largest
// magnitude: ||x|| itself overflows float32 for rows near 1e38 (and 1 / ||x|| is
// subnormal), so the gradient divides by scaled_norm, then by unit, last. The
// composite op computes them once for both steps.
struct Rows {
  at::Tensor q;
  at::Tensor unit;         // [N, 1] the row's largest magnitude (1 for an all-zero or NaN row)
  at::Tensor scaled_norm;  // [N, 1] max(||x / unit||, 1e-12 / unit), in [1, sqrt(D)] unless clamped
  at::Tensor clamped;      // [N, 1] ||x|| < 1e-12: q = x / 1e-12, a linear map (no projection)
};

// x / max(||x||, 1e-12), as F.normalize, with ||x|| measured in units of the
// row's largest magnitude, so that the sum of squares cannot overflow (|x| >=
// 1e19 in fp32 would give a zero row) nor underflow. An all-zero row stays
// zero; a NaN or inf makes the row NaN (inf / inf), never a finite vector.
Rows normalise(const at::Tensor& embeddings, at::ScalarType acc) {
  const at::Tensor x = embeddings.to(acc);
  const at::Tensor largest = x.abs().amax({1}, /*keepdim=*/true);
  const at::Tensor unit = at::where(largest > 0, largest, at::ones_like(largest));  // all-zero row, or NaN
  const at::Tensor scaled = x / unit;
  const at::Tensor norm = scaled.norm(2, {1}, /*keepdim=*/true);
  const at::Tensor floor = at::full_like(unit, 1e-12) / unit;  // not 1e-12 * (1 / unit): overflows for a subnormal unit
  const at::Tensor scaled_norm = at::maximum(norm, floor);
  return {(scaled / scaled_norm).contiguous(), unit, scaled_norm, norm < floor};
}

Partials run_queue_pass(const QueuePass& pass, const MarginParams& params) {
#ifdef WITH_CUDA
  if (pass.q.is_cuda()) return queue_pass_cuda(pass, params);
#endif
  TORCH_CHECK(pass.q.device().is_cpu(), "no chunked kernels for device ", pass.q.device());
  return queue_pass_cpu(pass, params);
}

Partials partials_of(const Rows& rows, const at::Tensor& labels, const at::Tensor& queue_weights,
                     const at::Tensor& queue_labels, const MarginParams& params, bool compute_grad,
                     int64_t chunk_size) {
  const at::Tensor& q = rows.q;
  const auto acc = q.scalar_type();
  const auto gemm = acc == at::kDouble ? at::kDouble : queue_weights.scalar_type();
  QueuePass pass{q.to(gemm).to(acc).contiguous(),
                 labels.contiguous(),
                 queue_weights.contiguous(),
                 queue_labels.contiguous(),
                 gemm,
                 compute_grad,
                 chunk_size};
  if (q.size(0) == 0 || queue_weights.size(0) == 0) {  // nothing kept anywhere
    const auto opts = q.options();
    return {at::full({q.size(0)}, -std::numeric_limits<double>::infinity(), opts), at::zeros({q.size(0)}, opts),
            compute_grad ? at::zeros({q.size(0), q.size(1)}, opts) : at::Tensor()};
  }
  return run_queue_pass(pass, params);
}

std::tuple<at::Tensor, at::Tensor> finalize_of(const Rows& rows, const at::Tensor& class_weights,
                                               const Partials& part, const MarginParams& params, bool compute_grad) {
  const at::Tensor& q = rows.q;
  const auto acc = q.scalar_type();
  const at::Tensor w = normalise(class_weights, acc).q;
  const at::Tensor positive_cos = (q * w).sum(1).contiguous();
  const at::Tensor row_max = part.row_max.to(acc).contiguous();
  const at::Tensor row_sum = part.row_sum.to(acc).contiguous();
  const auto opts = q.options();
  const int64_t n = q.size(0), dim = q.size(1);
  at::Tensor loss = at::empty({n}, opts);
  at::Tensor coef_positive = at::empty({n}, opts);
  at::Tensor coef_negative = at::empty({n}, opts);
#ifdef WITH_CUDA
  if (loss.is_cuda()) {
    finalize_rows_cuda(positive_cos, row_max, row_sum, loss, coef_positive, coef_negative, params);
  } else
#endif
  {
    finalize_rows_cpu(positive_cos, row_max, row_sum, loss, coef_positive, coef_negative, params);
  }
  if (!compute_grad) return {loss, at::empty({0, dim}, opts)};
  TORCH_CHECK(part.accumulator.defined() && part.accumulator.sizes() == q.sizes(),
              "the gradient needs the partials' accumulator [", n, ", ", dim, "], got ",
              part.accumulator.defined() ? part.accumulator.sizes() : at::IntArrayRef{});
  // d loss / d q, then through q = x / ||x||: (I - q q^T) g / ||x||, with ||x|| =
  // unit * scaled_norm divided out in two steps, the unit last: an entry that is
  // subnormal in float32 (rows near 1e38) is rounded once. Below F.normalize's
  // 1e-12 the map is x / 1e-12, whose derivative has no projection.
  const at::Tensor grad_q = coef_positive.unsqueeze(1) * w + coef_negative.unsqueeze(1) * part.accumulator.to(acc);
  const at::Tensor along_q = at::where(rows.clamped, at::zeros_like(rows.scaled_norm), (q * grad_q).sum(1, true));
  const at::Tensor grad_x = (grad_q - q * along_q) / rows.scaled_norm / rows.unit;
  return {loss, grad_x};
}

MarginParams margin_params(double scale, double m1, double m2, double m3, double interclass_filtering_threshold,
                           bool straight_through_margin) {
  return MarginParams{scale, m1, m2, m3, interclass_filtering_threshold, straight_through_margin};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> dcq_cross_entropy_partials(
    const at::Tensor& embeddings, const at::Tensor& labels, const at::Tensor& queue_weights,
    const at::Tensor& queue_labels, double scale, double interclass_filtering_threshold, bool compute_grad,
    int64_t chunk_size) {
  check_rows(embeddings, labels);
  check_queue(embeddings, queue_weights, queue_labels);
  const MarginParams params = margin_params(scale, 1.0, 0.0, 0.0, interclass_filtering_threshold, false);
  const Rows rows = normalise(embeddings, accumulation_dtype({&embeddings, &queue_weights}));
  Partials p = partials_of(rows, labels, queue_weights, queue_labels, params, compute_grad, chunk_size);
  if (!compute_grad) p.accumulator = at::empty({0, embeddings.size(1)}, p.row_sum.options());
  return {p.row_max, p.row_sum, p.accumulator};
}

std::tuple<at::Tensor, at::Tensor> dcq_cross_entropy_finalize(
    const at::Tensor& embeddings, const at::Tensor& class_weights, const at::Tensor& row_max,
    const at::Tensor& row_sum, const at::Tensor& accumulator, double scale, double m1, double m2, double m3,
    bool straight_through_margin, bool compute_grad) {
  TORCH_CHECK(embeddings.dim() == 2, "embeddings must be [N, D], got shape ", embeddings.sizes());
  TORCH_CHECK(class_weights.sizes() == embeddings.sizes(), "class_weights must have the shape of embeddings ",
              embeddings.sizes(), ", got ", class_weights.sizes());
  const int64_t rows = embeddings.size(0);
  TORCH_CHECK(row_max.dim() == 1 && row_max.size(0) == rows && row_sum.dim() == 1 && row_sum.size(0) == rows,
              "row_max and row_sum must be [", rows, "], got ", row_max.sizes(), " and ", row_sum.sizes());
  for (const auto* t : {&class_weights, &row_max, &row_sum, &accumulator}) {
    TORCH_CHECK(t->device() == embeddings.device(), "finalize's tensors must be on ", embeddings.device(),
                ", got one on ", t->device());
  }
  const MarginParams params = margin_params(scale, m1, m2, m3, 0.0, straight_through_margin);
  const Rows normalised = normalise(embeddings, accumulation_dtype({&embeddings, &class_weights, &row_sum}));
  return finalize_of(normalised, class_weights, Partials{row_max, row_sum, accumulator}, params, compute_grad);
}

std::tuple<at::Tensor, at::Tensor> dcq_cross_entropy(
    const at::Tensor& embeddings, const at::Tensor& class_weights, const at::Tensor& labels,
    const at::Tensor& queue_weights, const at::Tensor& queue_labels, double scale, double m1, double m2,
    double m3, double interclass_filtering_threshold, bool straight_through_margin, bool compute_grad,
    int64_t chunk_size) {
  check_rows(embeddings, labels);
  check_queue(embeddings, queue_weights, queue_labels);
  TORCH_CHECK(class_weights.sizes() == embeddings.sizes(), "class_weights must have the shape of embeddings ",
              embeddings.sizes(), ", got ", class_weights.sizes());
  TORCH_CHECK(class_weights.device() == embeddings.device(), "class_weights must be on ", embeddings.device(),
              ", got ", class_weights.device());
  const MarginParams params =
      margin_params(scale, m1, m2, m3, interclass_filtering_threshold, straight_through_margin);
  // One accumulation dtype and one normalisation for both steps.
  const Rows rows = normalise(embeddings, accumulation_dtype({&embeddings, &class_weights, &queue_weights}));
  const Partials part = partials_of(rows, labels, queue_weights, queue_labels, params, compute_grad, chunk_size);
  return finalize_of(rows, class_weights, part, params, compute_grad);
}

TORCH_LIBRARY_IMPL(dcq_ops, CPU, m) {
  m.impl("dcq_cross_entropy", &dcq_cross_entropy);
  m.impl("dcq_cross_entropy_partials", &dcq_cross_entropy_partials);
  m.impl("dcq_cross_entropy_finalize", &dcq_cross_entropy_finalize);
}
#ifdef WITH_CUDA
TORCH_LIBRARY_IMPL(dcq_ops, CUDA, m) {
  m.impl("dcq_cross_entropy", &dcq_cross_entropy);
  m.impl("dcq_cross_entropy_partials", &dcq_cross_entropy_partials);
  m.impl("dcq_cross_entropy_finalize", &dcq_cross_entropy_finalize);
}
#endif

}  // namespace dcq_ops
