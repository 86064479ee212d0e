// CUDA epilogue of one queue chunk (one block per row) and the per-row
// finalisation. The math is common/margin.h, shared with the CPU kernels.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cub/block/block_reduce.cuh>

#include "../margin_ce.h"

namespace dcq_ops {
namespace {

constexpr int kThreads = 256;

// cub::Max is gone from CCCL 3; a functor of our own works with every version.
struct MaxOp {
  __device__ __forceinline__ float operator()(float a, float b) const { return fmaxf(a, b); }
};

__global__ void chunk_epilogue_kernel(float* __restrict__ logits, const int64_t* __restrict__ labels,
                                      const int64_t* __restrict__ chunk_labels, float* __restrict__ row_max,
                                      float* __restrict__ row_sum, float* __restrict__ rescale, int64_t cols,
                                      MarginParams p) {
  using BlockReduce = cub::BlockReduce<float, kThreads>;
  __shared__ typename BlockReduce::TempStorage temp;
  __shared__ float shared_max;
  const int64_t i = blockIdx.x;
  float* row = logits + i * cols;
  const long long label = labels[i];

  // Pass 1: max of the kept logits of this chunk.
  float local_max = -INFINITY;
  for (int64_t j = threadIdx.x; j < cols; j += kThreads) {
    if (is_excluded(label, chunk_labels[j])) continue;
    bool filtered;
    local_max = fmaxf(local_max, negative_logit(row[j], p, &filtered));
  }
  const float chunk_max = BlockReduce(temp).Reduce(local_max, MaxOp());
  if (threadIdx.x == 0) shared_max = fmaxf(row_max[i], chunk_max);
  __syncthreads();
  const float new_max = shared_max;

  // Pass 2: exp(z - new_max) into the sum; into the row only where it carries a gradient.
  float local_sum = 0.f;
  for (int64_t j = threadIdx.x; j < cols; j += kThreads) {
    if (is_excluded(label, chunk_labels[j])) {
      row[j] = 0.f;
      continue;
    }
    bool filtered;
    const float e = __expf(negative_logit(row[j], p, &filtered) - new_max);
    local_sum += e;
    row[j] = filtered ? 0.f : e;
  }
  __syncthreads();  // temp storage is reused
  const float chunk_sum = BlockReduce(temp).Sum(local_sum);
  if (threadIdx.x == 0) {
    const float alpha = rescale_factor(row_max[i], new_max);
    row_sum[i] = row_sum[i] * alpha + chunk_sum;
    row_max[i] = new_max;
    rescale[i] = alpha;
  }
}

__global__ void finalize_rows_kernel(const float* __restrict__ positive_cos, const float* __restrict__ row_max,
                                     const float* __restrict__ row_sum, float* __restrict__ loss,
                                     float* __restrict__ coef_positive, float* __restrict__ coef_negative,
                                     int64_t rows, MarginParams p) {
  const int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x;
  if (i >= rows) return;
  const RowResult r = finalize_row(positive_cos[i], row_max[i], row_sum[i], p);
  loss[i] = r.loss;
  coef_positive[i] = r.coef_positive;
  coef_negative[i] = r.coef_negative;
}

}  // namespace

void chunk_epilogue_cuda(at::Tensor& logits, const at::Tensor& labels, const at::Tensor& chunk_labels,
                         at::Tensor& row_max, at::Tensor& row_sum, at::Tensor& rescale, const MarginParams& p) {
  const int64_t rows = logits.size(0);
  if (rows == 0) return;
  const c10::cuda::CUDAGuard guard(logits.device());
  chunk_epilogue_kernel<<<rows, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      logits.data_ptr<float>(), labels.data_ptr<int64_t>(), chunk_labels.data_ptr<int64_t>(),
      row_max.data_ptr<float>(), row_sum.data_ptr<float>(), rescale.data_ptr<float>(), logits.size(1), p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void finalize_rows_cuda(const at::Tensor& positive_cos, const at::Tensor& row_max, const at::Tensor& row_sum,
                        at::Tensor& loss, at::Tensor& coef_positive, at::Tensor& coef_negative,
                        const MarginParams& p) {
  const int64_t rows = positive_cos.size(0);
  if (rows == 0) return;
  const c10::cuda::CUDAGuard guard(positive_cos.device());
  const int blocks = static_cast<int>((rows + kThreads - 1) / kThreads);
  finalize_rows_kernel<<<blocks, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      positive_cos.data_ptr<float>(), row_max.data_ptr<float>(), row_sum.data_ptr<float>(),
      loss.data_ptr<float>(), coef_positive.data_ptr<float>(), coef_negative.data_ptr<float>(), rows, p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace dcq_ops
