// The fused epilogue of one tile of logits on the CPU, run right after the
// GEMM that produced the tile, while it is still in cache.
#pragma once

#include <ATen/ATen.h>

#include "../common/margin.h"

namespace dcq_ops {

// logits: [rows, cols] row-major, holding the cosines q_i . W_j on entry and,
// on exit, the probabilities exp(z_ij - new_max_i) of the entries that carry a
// gradient (0 for excluded and filtered ones), rounded through `p_dtype` (the
// GEMM operand dtype) as the second GEMM will read them. row_max/row_sum [rows]
// hold the online log-sum-exp state and are updated; alpha [rows] receives
// exp(old_max - new_max), by which the row's accumulator must be scaled.
// float runs the widest variant this CPU has (AVX-512, AVX2, plain C++: see
// cpu_capability()); double runs plain C++.
template <typename T>
void epilogue_tile(T* logits, int64_t rows, int64_t cols, const int64_t* labels, const int64_t* queue_labels,
                   T* row_max, T* row_sum, T* alpha, const MarginParams& params, at::ScalarType p_dtype);

// acc [rows, dim] row i *= alpha[i] (rows with alpha 1 untouched).
template <typename T>
void rescale_rows(T* acc, int64_t rows, int64_t dim, const T* alpha);

// The epilogue variant in use: "avx512", "avx2" or "default" (ATEN_CPU_CAPABILITY
// lowers it, as it does ATen's own kernels).
const char* cpu_capability();

}  // namespace dcq_ops
