// Argument checks of the enqueue op, shared by its CPU and CUDA kernels.
#include "queue.h"

namespace dcq_ops {

at::Tensor check_enqueue_args(const at::Tensor& weights, const at::Tensor& labels, const at::Tensor& ptr,
                              const at::Tensor& class_weights, const at::Tensor& class_labels,
                              const std::optional<at::Tensor>& bad_reasons) {
  TORCH_CHECK(weights.dim() == 2 && weights.is_contiguous(), "queue weights must be a contiguous [K, D] tensor");
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == weights.size(0) && labels.scalar_type() == at::kLong &&
                  labels.is_contiguous(),
              "queue labels must be a contiguous int64 [K] tensor with K = ", weights.size(0));
  TORCH_CHECK(ptr.numel() == 1 && ptr.scalar_type() == at::kLong, "queue ptr must be a one-element int64 tensor");
  TORCH_CHECK(class_weights.dim() == 2 && class_weights.size(1) == weights.size(1),
              "class_weights must be [B, D] with D = ", weights.size(1), ", got shape ", class_weights.sizes());
  TORCH_CHECK(class_labels.dim() == 1 && class_labels.size(0) == class_weights.size(0) &&
                  class_labels.scalar_type() == at::kLong,
              "class_labels must be int64 [B] with B = ", class_weights.size(0));
  TORCH_CHECK(class_weights.size(0) <= weights.size(0), "cannot enqueue a batch of ", class_weights.size(0),
              " class weights into a queue of ", weights.size(0), " slots");
  if (bad_reasons.has_value()) {
    TORCH_CHECK(bad_reasons->numel() == 1 && bad_reasons->scalar_type() == at::kLong &&
                    bad_reasons->device() == weights.device(),
                "the enqueue's bad_reasons must be a one-element int64 tensor on ", weights.device(), ", got ",
                bad_reasons->scalar_type(), " ", bad_reasons->sizes(), " on ", bad_reasons->device());
  }
  for (const auto* t : {&labels, &ptr, &class_weights, &class_labels}) {
    TORCH_CHECK(t->device() == weights.device(), "enqueue tensors must all be on ", weights.device(), ", got ",
                t->device());
  }
  return class_weights.to(at::kFloat).contiguous();
}

}  // namespace dcq_ops
