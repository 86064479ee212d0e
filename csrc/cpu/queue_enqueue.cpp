// CPU kernel of the FIFO enqueue.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>

#include "../queue.h"

namespace dcq_ops {

void queue_enqueue_cpu(at::Tensor& weights, at::Tensor& labels, at::Tensor& ptr, const at::Tensor& class_weights,
                       const at::Tensor& class_labels, const std::optional<at::Tensor>& bad_reasons) {
  const at::Tensor class_weights_f32 =
      check_enqueue_args(weights, labels, ptr, class_weights, class_labels, bad_reasons);
  if (bad_reasons.has_value() && bad_reasons->item<int64_t>() != 0) return;  // a CPU tensor: no device to wait for
  const at::Tensor class_labels_c = class_labels.contiguous();
  const int64_t batch = class_weights.size(0);
  const int64_t slots = weights.size(0);
  const int64_t dim = weights.size(1);
  if (batch == 0) return;
  int64_t* head = ptr.data_ptr<int64_t>();
  const int64_t start = ((*head % slots) + slots) % slots;
  const float* src = class_weights_f32.data_ptr<float>();
  const int64_t* src_labels = class_labels_c.data_ptr<int64_t>();
  int64_t* dst_labels = labels.data_ptr<int64_t>();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weights.scalar_type(), "queue_enqueue_cpu", [&] {
    scalar_t* dst = weights.data_ptr<scalar_t>();
    at::parallel_for(0, batch, 16, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const float* class_weight = src + i * dim;
        // In double, the square of any float is a normal number: no overflow
        // (|class_weight| >= 1e19 would make a zero row) and no underflow.
        double sq = 0.0;
        for (int64_t d = 0; d < dim; ++d) sq += static_cast<double>(class_weight[d]) * class_weight[d];
        const double inv = 1.0 / std::fmax(std::sqrt(sq), 1e-12);  // an all-zero class weight stays zero
        const int64_t slot = (start + i) % slots;
        scalar_t* out = dst + slot * dim;
        for (int64_t d = 0; d < dim; ++d) out[d] = static_cast<scalar_t>(static_cast<float>(class_weight[d] * inv));
        dst_labels[slot] = src_labels[i];
      }
    });
  });
  *head = (start + batch) % slots;
}

TORCH_LIBRARY_IMPL(dcq_ops, CPU, m) { m.impl("queue_enqueue_", &queue_enqueue_cpu); }

}  // namespace dcq_ops
