// Device-generic driver of the chunked backend. One pass over the queue gives
// the loss and the gradient: for each chunk, a GEMM for the cosines, the fused
// epilogue (mask, filtering, online log-sum-exp, probabilities), and a second
// GEMM that accumulates sum_j exp(z_ij - max_i) W_j with flash-attention style
// rescaling. The backward pass then only scales the saved gradient, so it never
// reads the queue, which the caller overwrites right after the forward.
// Memory: O(N * chunk + N * D), never O(N * K).
#include "margin_ce.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <limits>

namespace dcq_ops {
namespace {

// C = A @ B with an fp32 result. fp32 operands use mm; half operands use
// aten::mm.dtype (fp32 output from half inputs) where the device has it, so the
// logits are never rounded to 16 bits; otherwise they are upcast.
at::Tensor mm_fp32_out(const at::Tensor& a, const at::Tensor& b) {
  if (a.scalar_type() == at::kFloat && b.scalar_type() == at::kFloat) return at::mm(a, b);
#ifdef WITH_CUDA
  if (a.is_cuda()) {
    static const auto op = c10::Dispatcher::singleton().findOp({"aten::mm", "dtype"});
    if (op.has_value()) {
      return op->typed<at::Tensor(const at::Tensor&, const at::Tensor&, at::ScalarType)>().call(a, b, at::kFloat);
    }
  }
#endif
  return at::mm(a.to(at::kFloat), b.to(at::kFloat));
}

int64_t default_chunk_size(const at::Tensor& queue_weights, int64_t rows) {
  // Bound the [rows, chunk] fp32 logits to ~64 MiB on a GPU, ~8 MiB on a CPU
  // (cache-friendly), but keep chunks large enough for efficient GEMMs.
  const int64_t budget = queue_weights.is_cuda() ? (int64_t{64} << 20) : (int64_t{8} << 20);
  int64_t chunk = budget / (4 * std::max<int64_t>(rows, 1));
  chunk = std::max<int64_t>(256, std::min<int64_t>(chunk, 65536));
  return std::min<int64_t>(chunk, std::max<int64_t>(queue_weights.size(0), 1));
}

void check_inputs(const at::Tensor& embeddings, const at::Tensor& class_weights, const at::Tensor& labels,
                  const at::Tensor& queue_weights, const at::Tensor& queue_labels) {
  TORCH_CHECK(embeddings.dim() == 2, "embeddings must be [N, D], got shape ", embeddings.sizes());
  TORCH_CHECK(class_weights.sizes() == embeddings.sizes(), "class_weights must have the shape of embeddings ",
              embeddings.sizes(), ", got ", class_weights.sizes());
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == embeddings.size(0), "labels must be [N] with N = ",
              embeddings.size(0), ", got shape ", labels.sizes());
  TORCH_CHECK(queue_weights.dim() == 2 && queue_weights.size(1) == embeddings.size(1),
              "queue_weights must be [K, D] with D = ", embeddings.size(1), ", got shape ", queue_weights.sizes());
  TORCH_CHECK(queue_labels.dim() == 1 && queue_labels.size(0) == queue_weights.size(0),
              "queue_labels must be [K] with K = ", queue_weights.size(0), ", got shape ", queue_labels.sizes());
  TORCH_CHECK(labels.scalar_type() == at::kLong && queue_labels.scalar_type() == at::kLong,
              "labels and queue_labels must be int64, got ", labels.scalar_type(), " and ",
              queue_labels.scalar_type());
  for (const auto* t : {&embeddings, &class_weights, &queue_weights}) {
    TORCH_CHECK(at::isFloatingType(t->scalar_type()), "expected a floating-point tensor, got ", t->scalar_type());
  }
  const auto device = embeddings.device();
  for (const auto* t : {&class_weights, &labels, &queue_weights, &queue_labels}) {
    TORCH_CHECK(t->device() == device, "all tensors must be on ", device, ", got one on ", t->device());
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> margin_cross_entropy(
    const at::Tensor& embeddings, const at::Tensor& class_weights, const at::Tensor& labels,
    const at::Tensor& queue_weights, const at::Tensor& queue_labels, double scale, double m1, double m2,
    double m3, double filter_threshold, bool straight_through, bool compute_grad, int64_t chunk_size) {
  check_inputs(embeddings, class_weights, labels, queue_weights, queue_labels);
  const MarginParams params{static_cast<float>(scale), static_cast<float>(m1),           static_cast<float>(m2),
                            static_cast<float>(m3),    static_cast<float>(filter_threshold), straight_through};
  const int64_t rows = embeddings.size(0);
  const int64_t dim = embeddings.size(1);
  const int64_t queue_size = queue_weights.size(0);
  const auto f32 = embeddings.options().dtype(at::kFloat);

  // Prologue in fp32: normalised embeddings and class weights, positive cosine.
  const at::Tensor x = embeddings.to(at::kFloat);
  const at::Tensor x_norm = x.norm(2, {1}, /*keepdim=*/true).clamp_min(1e-12);
  const at::Tensor q = x / x_norm;
  const at::Tensor class_w = class_weights.to(at::kFloat);
  const at::Tensor w = class_w / class_w.norm(2, {1}, /*keepdim=*/true).clamp_min(1e-12);
  const at::Tensor positive_cos = (q * w).sum(1);

  // On a GPU the GEMMs run in the promoted input dtype (tensor cores) with fp32
  // results; a CPU has no fast half GEMM, so there everything runs in fp32 and
  // the normalised embeddings are never rounded to 16 bits.
  const auto gemm_dtype = embeddings.is_cuda()
                              ? at::promote_types(embeddings.scalar_type(), queue_weights.scalar_type())
                              : at::kFloat;
  const at::Tensor q_gemm = q.to(gemm_dtype);
  const at::Tensor labels_c = labels.contiguous();
  const at::Tensor queue_w = queue_weights.contiguous();
  const at::Tensor queue_l = queue_labels.contiguous();

  at::Tensor row_max = at::full({rows}, -std::numeric_limits<float>::infinity(), f32);
  at::Tensor row_sum = at::zeros({rows}, f32);
  at::Tensor rescale = at::empty({rows}, f32);
  at::Tensor accumulator = compute_grad ? at::zeros({rows, dim}, f32) : at::Tensor();

  const int64_t chunk = chunk_size > 0 ? chunk_size : default_chunk_size(queue_weights, rows);
  for (int64_t start = 0; start < queue_size && rows > 0; start += chunk) {
    const int64_t len = std::min(chunk, queue_size - start);
    const at::Tensor chunk_w = queue_w.narrow(0, start, len).to(gemm_dtype);
    const at::Tensor chunk_l = queue_l.narrow(0, start, len);
    at::Tensor logits = mm_fp32_out(q_gemm, chunk_w.t());  // [rows, len] cosines
#ifdef WITH_CUDA
    if (logits.is_cuda()) {
      chunk_epilogue_cuda(logits, labels_c, chunk_l, row_max, row_sum, rescale, params);
    } else
#endif
    {
      chunk_epilogue_cpu(logits, labels_c, chunk_l, row_max, row_sum, rescale, params);
    }
    if (compute_grad) {
      accumulator.mul_(rescale.unsqueeze(1));
      accumulator.add_(mm_fp32_out(logits.to(gemm_dtype), chunk_w));
    }
  }

  at::Tensor loss = at::empty({rows}, f32);
  at::Tensor coef_positive = at::empty({rows}, f32);
  at::Tensor coef_negative = at::empty({rows}, f32);
#ifdef WITH_CUDA
  if (loss.is_cuda()) {
    finalize_rows_cuda(positive_cos, row_max, row_sum, loss, coef_positive, coef_negative, params);
  } else
#endif
  {
    finalize_rows_cpu(positive_cos, row_max, row_sum, loss, coef_positive, coef_negative, params);
  }
  if (!compute_grad) return {loss, at::empty({0, dim}, f32)};

  // d loss / d q, then through the normalisation: (I - q q^T) g / ||x||.
  const at::Tensor grad_q = coef_positive.unsqueeze(1) * w + coef_negative.unsqueeze(1) * accumulator;
  const at::Tensor grad_x = (grad_q - q * (q * grad_q).sum(1, /*keepdim=*/true)) / x_norm;
  return {loss, grad_x};
}

TORCH_LIBRARY_IMPL(dcq_ops, CPU, m) { m.impl("margin_cross_entropy", &margin_cross_entropy); }
#ifdef WITH_CUDA
TORCH_LIBRARY_IMPL(dcq_ops, CUDA, m) { m.impl("margin_cross_entropy", &margin_cross_entropy); }
#endif

}  // namespace dcq_ops
