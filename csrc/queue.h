// FIFO enqueue into the class queue: L2-normalise the keys, cast them to the
// queue's dtype and write them at slots ptr, ptr+1, ... (mod K); the pointer
// lives on the queue's device and is advanced there, with no host sync.
#pragma once

#include <ATen/ATen.h>

namespace dcq_ops {

// Checks shared by every device's kernel; returns the keys as contiguous fp32.
at::Tensor check_enqueue_args(const at::Tensor& weights, const at::Tensor& labels, const at::Tensor& ptr,
                              const at::Tensor& keys, const at::Tensor& key_labels);

void queue_enqueue_cpu(at::Tensor& weights, at::Tensor& labels, at::Tensor& ptr, const at::Tensor& keys,
                       const at::Tensor& key_labels);
#ifdef WITH_CUDA
void queue_enqueue_cuda(at::Tensor& weights, at::Tensor& labels, at::Tensor& ptr, const at::Tensor& keys,
                        const at::Tensor& key_labels);
#endif

}  // namespace dcq_ops
