// Run-time choice of the tile epilogue's instruction set, as ATen's dispatch
// does: the capability ATen uses (which honours ATEN_CPU_CAPABILITY=default /
// avx2 to force a narrower one), confirmed against what the CPU reports.
#include "epilogue.h"

#include <ATen/Version.h>

#include "epilogue_kernels.h"
#include "epilogue_scalar.h"

namespace dcq_ops {
namespace {

enum class Isa { kDefault, kAvx2, kAvx512 };

Isa detect() {
#if defined(__x86_64__) || defined(_M_X64)
  const std::string aten = at::get_cpu_capability();
  if (aten.rfind("AVX512", 0) == 0 && __builtin_cpu_supports("avx512f")) return Isa::kAvx512;
  if ((aten.rfind("AVX512", 0) == 0 || aten == "AVX2") && __builtin_cpu_supports("avx2") &&
      __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")) {
    return Isa::kAvx2;
  }
#endif
  return Isa::kDefault;
}

Isa isa() {
  static const Isa chosen = detect();
  return chosen;
}

cpu_kernels::Rounding rounding_of(at::ScalarType dtype) {
  if (dtype == at::kBFloat16) return cpu_kernels::Rounding::kBFloat16;
  if (dtype == at::kHalf) return cpu_kernels::Rounding::kHalf;
  return cpu_kernels::Rounding::kNone;
}

}  // namespace

const char* cpu_capability() {
  switch (isa()) {
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    default: return "default";
  }
}

template <>
void epilogue_tile<float>(float* logits, int64_t rows, int64_t cols, const int64_t* labels,
                          const int64_t* queue_labels, float* row_max, float* row_sum, float* alpha,
                          const MarginParams& params, at::ScalarType p_dtype) {
  const cpu_kernels::TileArgs args{logits, rows, cols, labels, queue_labels, row_max, row_sum, alpha,
                                   static_cast<float>(params.scale),
                                   static_cast<float>(params.interclass_filtering_threshold), rounding_of(p_dtype)};
  switch (isa()) {
#if defined(__x86_64__) || defined(_M_X64)
    case Isa::kAvx512: return cpu_kernels::epilogue_f32_avx512(args);
    case Isa::kAvx2: return cpu_kernels::epilogue_f32_avx2(args);
#endif
    default: return cpu_kernels::epilogue_f32_default(args);
  }
}

template <>
void epilogue_tile<double>(double* logits, int64_t rows, int64_t cols, const int64_t* labels,
                           const int64_t* queue_labels, double* row_max, double* row_sum, double* alpha,
                           const MarginParams& params, at::ScalarType p_dtype) {
  epilogue_rows_scalar<double>(logits, rows, cols, labels, queue_labels, row_max, row_sum, alpha, params,
                               rounding_of(p_dtype));
}

template <>
void rescale_rows<float>(float* acc, int64_t rows, int64_t dim, const float* alpha) {
  switch (isa()) {
#if defined(__x86_64__) || defined(_M_X64)
    case Isa::kAvx512: return cpu_kernels::rescale_rows_avx512(acc, rows, dim, alpha);
    case Isa::kAvx2: return cpu_kernels::rescale_rows_avx2(acc, rows, dim, alpha);
#endif
    default: return cpu_kernels::rescale_rows_default(acc, rows, dim, alpha);
  }
}

template <>
void rescale_rows<double>(double* acc, int64_t rows, int64_t dim, const double* alpha) {
  rescale_rows_scalar<double>(acc, rows, dim, alpha);
}

}  // namespace dcq_ops
