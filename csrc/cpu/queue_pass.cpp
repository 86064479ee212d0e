// The CPU queue pass (partials of every row over the queue), split into
// (row block x queue split) tasks run in parallel: each task walks its split
// chunk by chunk, and for each chunk runs
//
//   GEMM 1   logits = q_block @ W_chunk^T        (this thread only: cpu/tile_gemm.h)
//   epilogue mask, margin/filter, online max and sum, probabilities in place
//   GEMM 2   acc_block = acc_block * alpha + P @ W_chunk
//
// so the tile of logits is produced, consumed and reused while it is in this
// core's cache, and the chunk of the queue is read from memory once per task
// for both GEMMs. The splits of a row block are merged at the end (the loss
// algebra's merge). Memory: O(N * D * splits + threads * tile), never O(N * K).
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <type_traits>

#include "../margin_ce.h"
#include "epilogue.h"
#include "tile_gemm.h"

namespace dcq_ops {
namespace {

constexpr int64_t kMaxBlockRows = 256;


struct Plan {
  int64_t block_rows;  // rows per task
  int64_t row_blocks;
  int64_t splits;      // queue splits per row block
  int64_t split_size;  // queue entries per split
  int64_t chunk;       // queue entries per GEMM
};

// Row blocks of at most kMaxBlockRows (equal sizes), then as many queue splits
// as make the number of tasks a multiple of the thread count, so that every
// thread gets the same work (at::parallel_for hands out equal contiguous ranges).
Plan make_plan(int64_t rows, int64_t queue_size, int64_t dim, int64_t element_size, int64_t chunk_override,
               GemmProvider provider) {
  Plan p{};
  const int64_t blocks = (rows + kMaxBlockRows - 1) / kMaxBlockRows;
  p.block_rows = (rows + blocks - 1) / blocks;
  p.row_blocks = (rows + p.block_rows - 1) / p.block_rows;
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  p.splits = p.row_blocks % threads == 0 ? 1 : threads / std::gcd(p.row_blocks, threads);
  p.split_size = (queue_size + p.splits - 1) / p.splits;
  if (chunk_override > 0) {
    p.chunk = chunk_override;
  } else {
    p.chunk = TileGemm::chunk_width(provider, p.block_rows, dim, element_size);
  }
  p.chunk = std::max<int64_t>(1, std::min(p.chunk, p.split_size));
  return p;
}

// Is there a row with a finite sum whose accumulator [rows, dim] is not finite?
template <typename T>
bool has_poisoned_row(const T* row_sum, const T* acc, int64_t rows, int64_t dim) {
  for (int64_t i = 0; i < rows; ++i) {
    if (!std::isfinite(row_sum[i])) continue;  // NaN already: the row keeps a non-finite value
    bool finite = true;
    for (int64_t d = 0; d < dim; ++d) finite &= std::isfinite(acc[i * dim + d]);
    if (!finite) return true;
  }
  return false;
}

template <typename T>
Partials queue_pass(const QueuePass& pass, const MarginParams& params) {
  const at::Tensor& q = pass.q;
  const int64_t rows = q.size(0), dim = q.size(1), queue_size = pass.queue_weights.size(0);
  // float64 stays with ATen's BLAS (exact-arithmetic tests compare against it).
  const GemmProvider provider = std::is_same_v<T, float> ? cpu_gemm_provider() : GemmProvider::kAten;
  const Plan plan = make_plan(rows, queue_size, dim, sizeof(T), pass.chunk_size, provider);
  const auto opts = q.options();
  const at::Tensor max_ws = at::empty({plan.splits, rows}, opts);
  const at::Tensor sum_ws = at::empty({plan.splits, rows}, opts);
  const at::Tensor acc_ws = pass.compute_grad ? at::zeros({plan.splits, rows, dim}, opts) : at::Tensor();
  const bool convert_queue = pass.queue_weights.scalar_type() != q.scalar_type();
  const int64_t* labels = pass.labels.data_ptr<int64_t>();
  const int64_t* queue_labels = pass.queue_labels.data_ptr<int64_t>();

  at::parallel_for(0, plan.row_blocks * plan.splits, 1, [&](int64_t begin, int64_t end) {
    TileGemm gemm(provider, dim);
    // This thread's tile buffers, reused by every chunk of its tasks.
    at::Tensor logits_buffer = at::empty({plan.block_rows * plan.chunk}, opts);
    at::Tensor queue_buffer = convert_queue ? at::empty({plan.chunk * dim}, opts) : at::Tensor();
    at::Tensor alpha = at::empty({plan.block_rows}, opts);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t block = task / plan.splits, split = task % plan.splits;
      const int64_t r0 = block * plan.block_rows, nr = std::min(plan.block_rows, rows - r0);
      const int64_t k_begin = split * plan.split_size, k_end = std::min(queue_size, k_begin + plan.split_size);
      T* row_max = max_ws.data_ptr<T>() + split * rows + r0;
      T* row_sum = sum_ws.data_ptr<T>() + split * rows + r0;
      const at::Tensor q_block = q.narrow(0, r0, nr);
      at::Tensor acc_block = pass.compute_grad ? acc_ws[split].narrow(0, r0, nr) : at::Tensor();
      const auto run_task = [&](bool zero_nonfinite_in_gemm2) {
        std::fill(row_max, row_max + nr, -std::numeric_limits<T>::infinity());
        std::fill(row_sum, row_sum + nr, T(0));
        if (pass.compute_grad) acc_block.zero_();
        for (int64_t k0 = k_begin; k0 < k_end; k0 += plan.chunk) {
          const int64_t nk = std::min(plan.chunk, k_end - k0);
          at::Tensor chunk = pass.queue_weights.narrow(0, k0, nk);
          if (convert_queue) chunk = queue_buffer.narrow(0, 0, nk * dim).view({nk, dim}).copy_(chunk);
          at::Tensor logits = logits_buffer.narrow(0, 0, nr * nk).view({nr, nk});
          gemm.logits(q_block, chunk, logits);
          epilogue_tile<T>(logits.data_ptr<T>(), nr, nk, labels + r0, queue_labels + k0, row_max, row_sum,
                           alpha.data_ptr<T>(), params, pass.gemm_dtype);
          if (pass.compute_grad) {
            rescale_rows<T>(acc_block.data_ptr<T>(), nr, dim, alpha.data_ptr<T>());
            gemm.accumulate(acc_block, logits,
                            zero_nonfinite_in_gemm2 ? chunk.masked_fill(chunk.isfinite().logical_not(), 0) : chunk);
          }
        }
      };
      run_task(false);
      // GEMM 2 multiplies the probability 0 of an excluded slot by its weights,
      // so a non-finite slot that a row excludes would still make the row's
      // accumulator NaN (0 * NaN). Such a row, with a finite sum and a
      // non-finite accumulator, exists only when the queue holds a non-finite
      // value: the task then runs again with those values zeroed in GEMM 2
      // alone (GEMM 1 still sees them, so the rows that keep them stay NaN).
      if (pass.compute_grad && has_poisoned_row(row_sum, acc_block.data_ptr<T>(), nr, dim)) run_task(true);
    }
  });

  if (plan.splits == 1) {
    return {max_ws[0], sum_ws[0], pass.compute_grad ? acc_ws[0] : at::Tensor()};
  }
  // Merge the splits of each row: a max, then the sums rescaled to it.
  const at::Tensor merged_max = max_ws.amax(0);
  const at::Tensor reference = at::where(at::isinf(merged_max), at::zeros_like(merged_max), merged_max);
  const at::Tensor factor = at::exp(max_ws - reference);  // 0 for a split that kept nothing
  const at::Tensor merged_sum = (sum_ws * factor).sum(0);
  at::Tensor merged_acc;
  if (pass.compute_grad) merged_acc = (acc_ws * factor.unsqueeze(2)).sum(0);
  return {merged_max, merged_sum, merged_acc};
}

}  // namespace

Partials queue_pass_cpu(const QueuePass& pass, const MarginParams& params) {
  TORCH_CHECK(pass.q.scalar_type() == at::kFloat || pass.q.scalar_type() == at::kDouble,
              "the CPU queue pass accumulates in float32 or float64, got ", pass.q.scalar_type());
  return pass.q.scalar_type() == at::kDouble ? queue_pass<double>(pass, params) : queue_pass<float>(pass, params);
}

}  // namespace dcq_ops
