// CUDA kernel of the FIFO enqueue: one block per class weight normalises it and writes
// it at slot (ptr + i) mod K; a second launch on the same stream advances ptr,
// so every block reads the pointer before it moves and the host never syncs.
// Both kernels read bad_reasons on the device and do nothing unless it is 0.
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cub/block/block_reduce.cuh>

#include "../queue.h"

namespace dcq_ops {
namespace {

constexpr int kThreads = 128;

__device__ __forceinline__ int64_t wrap(int64_t v, int64_t slots) { return ((v % slots) + slots) % slots; }

template <typename scalar_t>
__global__ void enqueue_kernel(scalar_t* __restrict__ weights, int64_t* __restrict__ labels,
                               const int64_t* __restrict__ ptr, const float* __restrict__ class_weights,
                               const int64_t* __restrict__ class_labels, const int64_t* __restrict__ bad_reasons,
                               int64_t slots, int64_t dim) {
  // The whole block returns: bad_reasons is the same for every thread.
  if (bad_reasons != nullptr && bad_reasons[0] != 0) return;
  // In double, the square of any float is a normal number: no overflow
  // (|class_weight| >= 1e19 would make a zero row) and no underflow; D values
  // a class weight, so cheap.
  using BlockReduce = cub::BlockReduce<double, kThreads>;
  __shared__ typename BlockReduce::TempStorage temp;
  __shared__ double inv_norm;
  const int64_t i = blockIdx.x;
  const float* class_weight = class_weights + i * dim;
  double sq = 0.0;
  for (int64_t d = threadIdx.x; d < dim; d += kThreads) sq += static_cast<double>(class_weight[d]) * class_weight[d];
  const double total = BlockReduce(temp).Sum(sq);
  if (threadIdx.x == 0) inv_norm = 1.0 / fmax(sqrt(total), 1e-12);  // an all-zero class weight stays zero
  __syncthreads();
  const int64_t slot = wrap(ptr[0] + i, slots);
  scalar_t* out = weights + slot * dim;
  for (int64_t d = threadIdx.x; d < dim; d += kThreads) {
    out[d] = static_cast<scalar_t>(static_cast<float>(class_weight[d] * inv_norm));
  }
  if (threadIdx.x == 0) labels[slot] = class_labels[i];
}

__global__ void advance_ptr_kernel(int64_t* ptr, const int64_t* bad_reasons, int64_t batch, int64_t slots) {
  if (bad_reasons != nullptr && bad_reasons[0] != 0) return;
  ptr[0] = wrap(wrap(ptr[0], slots) + batch, slots);
}

}  // namespace

void queue_enqueue_cuda(at::Tensor& weights, at::Tensor& labels, at::Tensor& ptr, const at::Tensor& class_weights,
                        const at::Tensor& class_labels, const std::optional<at::Tensor>& bad_reasons) {
  const at::Tensor class_weights_f32 =
      check_enqueue_args(weights, labels, ptr, class_weights, class_labels, bad_reasons);
  const int64_t* bad_reasons_ptr = bad_reasons.has_value() ? bad_reasons->data_ptr<int64_t>() : nullptr;
  const at::Tensor class_labels_c = class_labels.contiguous();
  const int64_t batch = class_weights.size(0);
  if (batch == 0) return;
  const c10::cuda::CUDAGuard device_guard(weights.device());
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weights.scalar_type(), "queue_enqueue_cuda", [&] {
    enqueue_kernel<scalar_t><<<batch, kThreads, 0, stream>>>(
        weights.data_ptr<scalar_t>(), labels.data_ptr<int64_t>(), ptr.data_ptr<int64_t>(),
        class_weights_f32.data_ptr<float>(), class_labels_c.data_ptr<int64_t>(), bad_reasons_ptr,
        weights.size(0), weights.size(1));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  advance_ptr_kernel<<<1, 1, 0, stream>>>(ptr.data_ptr<int64_t>(), bad_reasons_ptr, batch, weights.size(0));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

TORCH_LIBRARY_IMPL(dcq_ops, CUDA, m) { m.impl("queue_enqueue_", &queue_enqueue_cuda); }

}  // namespace dcq_ops
