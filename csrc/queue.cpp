// Argument checks of the enqueue op, shared by its CPU and CUDA kernels.
#include "queue.h"

namespace dcq_ops {

at::Tensor check_enqueue_args(const at::Tensor& weights, const at::Tensor& labels, const at::Tensor& ptr,
                              const at::Tensor& keys, const at::Tensor& key_labels,
                              const std::optional<at::Tensor>& guard) {
  TORCH_CHECK(weights.dim() == 2 && weights.is_contiguous(), "queue weights must be a contiguous [K, D] tensor");
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == weights.size(0) && labels.scalar_type() == at::kLong &&
                  labels.is_contiguous(),
              "queue labels must be a contiguous int64 [K] tensor with K = ", weights.size(0));
  TORCH_CHECK(ptr.numel() == 1 && ptr.scalar_type() == at::kLong, "queue ptr must be a one-element int64 tensor");
  TORCH_CHECK(keys.dim() == 2 && keys.size(1) == weights.size(1), "keys must be [B, D] with D = ", weights.size(1),
              ", got shape ", keys.sizes());
  TORCH_CHECK(key_labels.dim() == 1 && key_labels.size(0) == keys.size(0) && key_labels.scalar_type() == at::kLong,
              "key_labels must be int64 [B] with B = ", keys.size(0));
  TORCH_CHECK(keys.size(0) <= weights.size(0), "cannot enqueue a batch of ", keys.size(0),
              " keys into a queue of ", weights.size(0), " slots");
  if (guard.has_value()) {
    TORCH_CHECK(guard->numel() == 1 && guard->scalar_type() == at::kLong && guard->device() == weights.device(),
                "the enqueue guard must be a one-element int64 tensor on ", weights.device(), ", got ",
                guard->scalar_type(), " ", guard->sizes(), " on ", guard->device());
  }
  for (const auto* t : {&labels, &ptr, &keys, &key_labels}) {
    TORCH_CHECK(t->device() == weights.device(), "enqueue tensors must all be on ", weights.device(), ", got ",
                t->device());
  }
  return keys.to(at::kFloat).contiguous();
}

}  // namespace dcq_ops
