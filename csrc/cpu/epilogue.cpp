// Scalar epilogue of a tile (cpu/epilogue.h): two sweeps over each row of the
// cache-resident tile, the max of the kept logits, then the exponentials.
#include "epilogue.h"

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <limits>

namespace dcq_ops {
namespace {

template <typename T>
T round_through(T v, at::ScalarType dtype) {
  switch (dtype) {
    case at::kBFloat16: return static_cast<T>(static_cast<float>(c10::BFloat16(static_cast<float>(v))));
    case at::kHalf: return static_cast<T>(static_cast<float>(c10::Half(static_cast<float>(v))));
    default: return v;
  }
}

}  // namespace

template <typename T>
void epilogue_tile(T* logits, int64_t rows, int64_t cols, const int64_t* labels, const int64_t* queue_labels,
                   T* row_max, T* row_sum, T* alpha, const MarginParams& params, at::ScalarType p_dtype) {
  const T scale = static_cast<T>(params.scale);
  const bool round = p_dtype == at::kBFloat16 || p_dtype == at::kHalf;
  for (int64_t i = 0; i < rows; ++i) {
    T* row = logits + i * cols;
    const int64_t label = labels[i];
    T tile_max = -std::numeric_limits<T>::infinity();
    for (int64_t j = 0; j < cols; ++j) {
      if (is_excluded(label, queue_labels[j])) continue;
      tile_max = dcq_max(tile_max, is_filtered(row[j], params) ? T(0) : scale * row[j]);
    }
    const T new_max = dcq_max(row_max[i], tile_max);
    // exp(z - new_max), measured from 0 while nothing has been kept (no NaN from -inf - -inf).
    const T reference = new_max == -std::numeric_limits<T>::infinity() ? T(0) : new_max;
    T sum = 0;
    for (int64_t j = 0; j < cols; ++j) {
      if (is_excluded(label, queue_labels[j])) {
        row[j] = 0;
        continue;
      }
      const bool filtered = is_filtered(row[j], params);
      const T e = dcq_exp((filtered ? T(0) : scale * row[j]) - reference);
      sum += e;
      row[j] = filtered ? T(0) : (round ? round_through(e, p_dtype) : e);
    }
    alpha[i] = rescale_factor(row_max[i], new_max);
    row_sum[i] = row_sum[i] * alpha[i] + sum;
    row_max[i] = new_max;
  }
}

template void epilogue_tile<float>(float*, int64_t, int64_t, const int64_t*, const int64_t*, float*, float*, float*,
                                   const MarginParams&, at::ScalarType);
template void epilogue_tile<double>(double*, int64_t, int64_t, const int64_t*, const int64_t*, double*, double*,
                                    double*, const MarginParams&, at::ScalarType);

}  // namespace dcq_ops
