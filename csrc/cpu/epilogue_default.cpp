// The tile epilogue in plain C++: the fallback for any CPU, the float64 path,
// and the meaning of the vectorised variants (epilogue_avx2.cpp,
// epilogue_avx512.cpp), which compute the same thing 8 or 16 logits at a time.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <limits>

#include "../common/margin.h"
#include "epilogue_kernels.h"
#include "epilogue_scalar.h"

namespace dcq_ops {
namespace {

template <typename T>
T round_to(T v, cpu_kernels::Rounding rounding) {
  switch (rounding) {
    case cpu_kernels::Rounding::kBFloat16: return static_cast<T>(static_cast<float>(c10::BFloat16(static_cast<float>(v))));
    case cpu_kernels::Rounding::kHalf: return static_cast<T>(static_cast<float>(c10::Half(static_cast<float>(v))));
    default: return v;
  }
}

}  // namespace

template <typename T>
void epilogue_rows_scalar(T* logits, int64_t rows, int64_t cols, const int64_t* labels, const int64_t* queue_labels,
                          T* row_max, T* row_sum, T* alpha, const MarginParams& params,
                          cpu_kernels::Rounding rounding) {
  const T scale = static_cast<T>(params.scale);
  constexpr T kMinusInf = -std::numeric_limits<T>::infinity();
  for (int64_t i = 0; i < rows; ++i) {
    T* row = logits + i * cols;
    const int64_t label = labels[i];
    // Sweep 1: the max of the kept logits (a filtered one counts as 0).
    T tile_max = kMinusInf;
    for (int64_t j = 0; j < cols; ++j) {
      if (is_excluded(label, queue_labels[j])) continue;
      tile_max = dcq_max(tile_max, is_filtered(row[j], params) ? T(0) : scale * row[j]);
    }
    const T new_max = dcq_max(row_max[i], tile_max);
    const T reference = new_max == kMinusInf ? T(0) : new_max;  // nothing kept yet: no -inf - -inf
    // Sweep 2: exp(z - new max) into the sum; into the row where the entry carries a gradient.
    // A non-finite cosine makes its e, hence the sum, NaN (the max above skips a NaN).
    T sum = 0;
    for (int64_t j = 0; j < cols; ++j) {
      if (is_excluded(label, queue_labels[j])) {
        row[j] = 0;
        continue;
      }
      const T c = row[j];
      const bool filtered = is_filtered(c, params);
      const T e = dcq_exp((filtered ? T(0) : scale * c) - reference) + zero_or_nan(c);
      sum += e;
      row[j] = filtered ? T(0) : round_to(e, rounding);
    }
    alpha[i] = rescale_factor(row_max[i], new_max);
    row_sum[i] = row_sum[i] * alpha[i] + sum;
    row_max[i] = new_max;
  }
}

template <typename T>
void rescale_rows_scalar(T* acc, int64_t rows, int64_t dim, const T* alpha) {
  for (int64_t i = 0; i < rows; ++i) {
    if (alpha[i] == T(1)) continue;
    for (int64_t d = 0; d < dim; ++d) acc[i * dim + d] *= alpha[i];
  }
}

template void epilogue_rows_scalar<float>(float*, int64_t, int64_t, const int64_t*, const int64_t*, float*, float*,
                                          float*, const MarginParams&, cpu_kernels::Rounding);
template void epilogue_rows_scalar<double>(double*, int64_t, int64_t, const int64_t*, const int64_t*, double*,
                                           double*, double*, const MarginParams&, cpu_kernels::Rounding);
template void rescale_rows_scalar<float>(float*, int64_t, int64_t, const float*);
template void rescale_rows_scalar<double>(double*, int64_t, int64_t, const double*);

namespace cpu_kernels {

void epilogue_f32_default(const TileArgs& a) {
  const MarginParams params{a.scale, 1.0, 0.0, 0.0, a.interclass_filtering_threshold, false};
  epilogue_rows_scalar<float>(a.logits, a.rows, a.cols, a.labels, a.queue_labels, a.row_max, a.row_sum, a.alpha,
                              params, a.rounding);
}

void rescale_rows_default(float* acc, int64_t rows, int64_t dim, const float* alpha) {
  rescale_rows_scalar<float>(acc, rows, dim, alpha);
}

}  // namespace cpu_kernels
}  // namespace dcq_ops
