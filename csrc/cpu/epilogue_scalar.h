// The plain C++ tile epilogue (epilogue_default.cpp), for float and double.
#pragma once

#include <cstdint>

#include "../common/margin.h"
#include "epilogue_kernels.h"

namespace dcq_ops {

template <typename T>
void epilogue_rows_scalar(T* logits, int64_t rows, int64_t cols, const int64_t* labels, const int64_t* queue_labels,
                          T* row_max, T* row_sum, T* alpha, const MarginParams& params,
                          cpu_kernels::Rounding rounding);

template <typename T>
void rescale_rows_scalar(T* acc, int64_t rows, int64_t dim, const T* alpha);

}  // namespace dcq_ops
