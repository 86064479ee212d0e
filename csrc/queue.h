// FIFO enqueue into the class queue: L2-normalise the class weights, cast them
// to the queue's dtype and write them at slots ptr, ptr+1, ... (mod K); the
// pointer lives on the queue's device and is advanced there, with no host sync.
// An optional bad_reasons (int64 [1] on the same device) skips the whole
// enqueue unless it is 0: a batch found bad on the device never enters the queue.
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace dcq_ops {

// Checks shared by every device's kernel; returns the class weights as contiguous fp32.
at::Tensor check_enqueue_args(const at::Tensor& weights, const at::Tensor& labels, const at::Tensor& ptr,
                              const at::Tensor& class_weights, const at::Tensor& class_labels,
                              const std::optional<at::Tensor>& bad_reasons);

void queue_enqueue_cpu(at::Tensor& weights, at::Tensor& labels, at::Tensor& ptr, const at::Tensor& class_weights,
                       const at::Tensor& class_labels, const std::optional<at::Tensor>& bad_reasons);
#ifdef WITH_CUDA
void queue_enqueue_cuda(at::Tensor& weights, at::Tensor& labels, at::Tensor& ptr, const at::Tensor& class_weights,
                        const at::Tensor& class_labels, const std::optional<at::Tensor>& bad_reasons);
#endif

}  // namespace dcq_ops
