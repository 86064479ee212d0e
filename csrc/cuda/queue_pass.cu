// The CUDA queue pass of the chunked backend (partials of every row over the
// queue): the queue in chunks; for each chunk
//
//   GEMM 1   logits = q @ W_chunk^T           cuBLAS, operands in the queue dtype, fp32 out
//   epilogue one pass: each row of the chunk is read once into registers; mask,
//            margin/filter, max, exp, sum; P = exp(z - max) written in the
//            GEMM dtype to its own buffer
//   GEMM 2   partial = P @ W_chunk             cuBLAS, fp32 out
//   update   acc = acc * alpha + partial       (alpha = exp(old max - new max))
//
// HBM traffic per logit (bf16 queue): GEMM 1 writes 4 bytes, the epilogue
// reads 4 and writes 2, GEMM 2 reads 2: 12 bytes, plus the chunk of W (read
// twice, from L2 the second time when it fits), and 12 D / C bytes for the
// accumulator update (1.5 bytes at D = 512, C = 4096). The chunk is sized so
// that the chunk of W stays in L2 for a small batch, and the logits of a
// large batch stay within a bounded workspace.
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/cuda/CUDAGuard.h>
#include <cub/block/block_reduce.cuh>

#include <algorithm>
#include <limits>

#include "../margin_ce.h"

namespace dcq_ops {
namespace {

constexpr int kThreads = 256;
constexpr int kItems = 32;  // logits per thread held in registers: chunks of up to 8192 entries
constexpr int64_t kMaxChunk = int64_t{kThreads} * kItems;
constexpr int64_t kLogitsBudgetBytes = int64_t{256} << 20;

// cub::Max is gone from CCCL 3; a functor of our own works with every version.
struct MaxOp {
  template <typename T>
  __device__ __forceinline__ T operator()(T a, T b) const {
    return a > b ? a : b;
  }
};

// One block per row of the chunk. The row's logits are read from HBM once and
// kept in registers between the max and the exponentials.
template <typename acc_t, typename p_t>
__global__ void chunk_epilogue_kernel(const acc_t* __restrict__ logits, p_t* __restrict__ probs,
                                      const int64_t* __restrict__ labels, const int64_t* __restrict__ chunk_labels,
                                      acc_t* __restrict__ row_max, acc_t* __restrict__ row_sum,
                                      acc_t* __restrict__ alpha, int64_t cols, MarginParams p) {
  using BlockReduce = cub::BlockReduce<acc_t, kThreads>;
  __shared__ typename BlockReduce::TempStorage temp;
  __shared__ acc_t shared_max;
  const int64_t i = blockIdx.x;
  const acc_t* row = logits + i * cols;
  p_t* out = probs + i * cols;
  const long long label = labels[i];
  const acc_t scale = static_cast<acc_t>(p.scale);
  constexpr acc_t kMinusInf = -std::numeric_limits<acc_t>::infinity();

  acc_t z[kItems];
  unsigned kept = 0, with_gradient = 0;  // bit t: item t is kept / carries a gradient
  acc_t local_max = kMinusInf;
#pragma unroll
  for (int t = 0; t < kItems; ++t) {
    const int64_t j = threadIdx.x + int64_t{t} * kThreads;
    z[t] = kMinusInf;
    if (j < cols && !is_excluded(label, chunk_labels[j])) {
      const acc_t c = row[j];
      const bool filtered = is_filtered(c, p);
      // + zero_or_nan(c): a non-finite cosine gives z = NaN, which the max
      // skips and the sum carries (exp(-inf) = 0 or filtering would hide an inf).
      z[t] = (filtered ? acc_t(0) : scale * c) + zero_or_nan(c);
      kept |= 1u << t;
      with_gradient |= filtered ? 0u : (1u << t);
      local_max = z[t] > local_max ? z[t] : local_max;
    }
  }
  const acc_t chunk_max = BlockReduce(temp).Reduce(local_max, MaxOp());
  if (threadIdx.x == 0) shared_max = dcq_max(row_max[i], chunk_max);
  __syncthreads();
  const acc_t new_max = shared_max;
  const acc_t reference = new_max == kMinusInf ? acc_t(0) : new_max;  // nothing kept yet: no -inf - -inf

  acc_t local_sum = 0;
#pragma unroll
  for (int t = 0; t < kItems; ++t) {
    const int64_t j = threadIdx.x + int64_t{t} * kThreads;
    if (j >= cols) break;
    acc_t e = 0;
    if (kept & (1u << t)) {
      e = dcq_exp(z[t] - reference);
      local_sum += e;
    }
    out[j] = static_cast<p_t>((with_gradient & (1u << t)) ? e : acc_t(0));
  }
  __syncthreads();  // temp storage is reused
  const acc_t chunk_sum = BlockReduce(temp).Sum(local_sum);
  if (threadIdx.x == 0) {
    const acc_t a = rescale_factor(row_max[i], new_max);
    row_sum[i] = row_sum[i] * a + chunk_sum;
    row_max[i] = new_max;
    alpha[i] = a;
  }
}

// acc = acc * alpha[row] + partial, elementwise over [rows, dim].
//
// GEMM 2 multiplies the probability 0 of an excluded slot by its weights, so a
// non-finite slot that a row excludes would still make the row's partial NaN
// (0 * NaN). A non-finite partial of a row whose running sum is finite (it has
// kept no non-finite value) is such a case, which only a queue holding a
// non-finite value makes: that element is recomputed here, plainly, with the
// non-finite queue values zeroed. The check costs one compare per element.
template <typename acc_t, typename p_t>
__global__ void rescale_accumulate_kernel(acc_t* __restrict__ acc, const acc_t* __restrict__ partial,
                                          const acc_t* __restrict__ alpha, const acc_t* __restrict__ row_sum,
                                          const p_t* __restrict__ probs, const p_t* __restrict__ chunk,
                                          int64_t rows, int64_t dim, int64_t cols) {
  const int64_t n = rows * dim;
  for (int64_t k = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; k < n; k += int64_t{gridDim.x} * blockDim.x) {
    const int64_t i = k / dim, d = k % dim;
    acc_t add = partial[k];
    if (!is_finite(add) && is_finite(row_sum[i])) {
      add = 0;
      for (int64_t j = 0; j < cols; ++j) {
        const acc_t w = static_cast<acc_t>(chunk[j * dim + d]);
        if (is_finite(w)) add += static_cast<acc_t>(probs[i * cols + j]) * w;
      }
    }
    acc[k] = acc[k] * alpha[i] + add;
  }
}

// out = a @ b with out in fp32 (or fp64) whatever the operand dtype: the cosines
// must not be rounded to 16 bits. aten::mm.dtype_out does this for 16-bit
// operands (cuBLAS with fp32 output); torch releases without it upcast.
void mm_into(at::Tensor& out, const at::Tensor& a, const at::Tensor& b) {
  if (a.scalar_type() == out.scalar_type()) {
    at::mm_out(out, a, b);  // fp32 honours TF32 per torch.get_float32_matmul_precision()
    return;
  }
  static const auto op = c10::Dispatcher::singleton().findOp({"aten::mm", "dtype_out"});
  if (op.has_value()) {
    op->typed<at::Tensor&(const at::Tensor&, const at::Tensor&, at::ScalarType, at::Tensor&)>().call(
        a, b, out.scalar_type(), out);
    return;
  }
  at::mm_out(out, a.to(out.scalar_type()), b.to(out.scalar_type()));
}

int64_t chunk_size(int64_t rows, int64_t dim, int64_t queue_size, int64_t element_size, int64_t requested) {
  if (requested > 0) return std::min(requested, kMaxChunk);
  // A chunk of W within a quarter of L2 (it is read by both GEMMs), and the
  // logits of the chunk within the workspace budget.
  const int64_t l2 = at::cuda::getCurrentDeviceProperties()->l2CacheSize;
  int64_t chunk = std::max<int64_t>(l2 / 4 / (dim * element_size), 256);
  chunk = std::min(chunk, kLogitsBudgetBytes / (4 * std::max<int64_t>(rows, 1)));
  chunk = std::max<int64_t>(256, chunk / 256 * 256);
  return std::min({chunk, kMaxChunk, std::max<int64_t>(queue_size, 1)});
}

template <typename acc_t, typename p_t>
Partials queue_pass(const QueuePass& pass, const MarginParams& params) {
  const int64_t rows = pass.q.size(0), dim = pass.q.size(1), queue_size = pass.queue_weights.size(0);
  const auto acc_opts = pass.q.options();
  const at::Tensor q = pass.q.to(pass.gemm_dtype);  // exact: q was rounded through this dtype already
  const at::Tensor weights =
      pass.queue_weights.scalar_type() == pass.gemm_dtype ? pass.queue_weights : pass.queue_weights.to(pass.gemm_dtype);
  const int64_t chunk = chunk_size(rows, dim, queue_size, weights.element_size(), pass.chunk_size);

  at::Tensor row_max = at::full({rows}, -std::numeric_limits<double>::infinity(), acc_opts);
  at::Tensor row_sum = at::zeros({rows}, acc_opts);
  at::Tensor alpha = at::empty({rows}, acc_opts);
  at::Tensor acc = pass.compute_grad ? at::zeros({rows, dim}, acc_opts) : at::Tensor();
  at::Tensor partial = pass.compute_grad ? at::empty({rows, dim}, acc_opts) : at::Tensor();
  at::Tensor logits_buffer = at::empty({rows * chunk}, acc_opts);
  at::Tensor probs_buffer = at::empty({rows * chunk}, acc_opts.dtype(pass.gemm_dtype));

  const auto stream = at::cuda::getCurrentCUDAStream();
  for (int64_t start = 0; start < queue_size; start += chunk) {
    const int64_t len = std::min(chunk, queue_size - start);
    const at::Tensor w = weights.narrow(0, start, len);
    at::Tensor logits = logits_buffer.narrow(0, 0, rows * len).view({rows, len});
    at::Tensor probs = probs_buffer.narrow(0, 0, rows * len).view({rows, len});
    mm_into(logits, q, w.t());
    chunk_epilogue_kernel<acc_t, p_t><<<rows, kThreads, 0, stream>>>(
        logits.data_ptr<acc_t>(), reinterpret_cast<p_t*>(probs.data_ptr()), pass.labels.data_ptr<int64_t>(),
        pass.queue_labels.data_ptr<int64_t>() + start, row_max.data_ptr<acc_t>(), row_sum.data_ptr<acc_t>(),
        alpha.data_ptr<acc_t>(), len, params);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (pass.compute_grad) {
      mm_into(partial, probs, w);
      const int blocks = static_cast<int>(std::min<int64_t>((rows * dim + kThreads - 1) / kThreads, 4096));
      rescale_accumulate_kernel<acc_t, p_t><<<blocks, kThreads, 0, stream>>>(
          acc.data_ptr<acc_t>(), partial.data_ptr<acc_t>(), alpha.data_ptr<acc_t>(), row_sum.data_ptr<acc_t>(),
          reinterpret_cast<const p_t*>(probs.data_ptr()), reinterpret_cast<const p_t*>(w.data_ptr()), rows, dim,
          len);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  }
  return {row_max, row_sum, acc};
}

template <typename acc_t>
__global__ void finalize_rows_kernel(const acc_t* __restrict__ positive_cos, const acc_t* __restrict__ row_max,
                                     const acc_t* __restrict__ row_sum, acc_t* __restrict__ loss,
                                     acc_t* __restrict__ coef_positive, acc_t* __restrict__ coef_negative,
                                     int64_t rows, MarginParams p) {
  const int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x;
  if (i >= rows) return;
  finalize_row<acc_t>(positive_cos[i], row_max[i], row_sum[i], p, &loss[i], &coef_positive[i], &coef_negative[i]);
}

}  // namespace

Partials queue_pass_cuda(const QueuePass& pass, const MarginParams& params) {
  const c10::cuda::CUDAGuard guard(pass.q.device());
  if (pass.q.scalar_type() == at::kDouble) return queue_pass<double, double>(pass, params);
  TORCH_CHECK(pass.q.scalar_type() == at::kFloat, "the CUDA queue pass accumulates in float32 or float64, got ",
              pass.q.scalar_type());
  switch (pass.gemm_dtype) {
    case at::kBFloat16: return queue_pass<float, at::BFloat16>(pass, params);
    case at::kHalf: return queue_pass<float, at::Half>(pass, params);
    case at::kFloat: return queue_pass<float, float>(pass, params);
    default: break;
  }
  TORCH_CHECK(false, "no CUDA queue pass for GEMM operands in ", pass.gemm_dtype);
  return {};
}

void finalize_rows_cuda(const at::Tensor& positive_cos, const at::Tensor& row_max, const at::Tensor& row_sum,
                        at::Tensor& loss, at::Tensor& coef_positive, at::Tensor& coef_negative,
                        const MarginParams& params) {
  const int64_t rows = positive_cos.size(0);
  if (rows == 0) return;
  const c10::cuda::CUDAGuard guard(positive_cos.device());
  const int blocks = static_cast<int>((rows + kThreads - 1) / kThreads);
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(loss.scalar_type(), "finalize_rows_cuda", [&] {
    finalize_rows_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
        positive_cos.data_ptr<scalar_t>(), row_max.data_ptr<scalar_t>(), row_sum.data_ptr<scalar_t>(),
        loss.data_ptr<scalar_t>(), coef_positive.data_ptr<scalar_t>(), coef_negative.data_ptr<scalar_t>(), rows,
        params);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace dcq_ops
