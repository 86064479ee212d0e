// The fp32 epilogue of a tile of logits, once per instruction set: plain C++
// (any CPU), AVX2 + FMA + F16C, and AVX-512F. Each variant lives in its own
// translation unit whose functions carry the target attribute of their
// instruction set, and that includes no torch header, so no inline function
// compiled for a wider instruction set can be picked by the linker for code
// that runs on a narrower one. epilogue.cpp picks a variant at run time from
// the CPU's capability, as ATen's dispatch does.
#pragma once

#include <cstdint>

namespace dcq_ops {
namespace cpu_kernels {

// The widest tile (queue entries per GEMM) the vectorised variants take; the
// CPU driver's chunks are at most this wide (cpu/queue_pass.cpp).
constexpr int64_t kMaxCols = 8192;

// How the probabilities are rounded before the second GEMM (its operand dtype).
enum class Rounding : int { kNone = 0, kBFloat16 = 1, kHalf = 2 };

// One tile: logits [rows, cols] row-major (cosines on entry, probabilities on
// exit); see cpu/epilogue.h for the meaning of every array.
struct TileArgs {
  float* logits;
  int64_t rows;
  int64_t cols;
  const int64_t* labels;        // [rows]
  const int64_t* queue_labels;  // [cols]
  float* row_max;               // [rows], updated
  float* row_sum;               // [rows], updated
  float* alpha;                 // [rows], written: exp(old max - new max)
  float scale;
  float interclass_filtering_threshold;  // 0 = no filtering
  Rounding rounding;
};

void epilogue_f32_default(const TileArgs& args);
void rescale_rows_default(float* acc, int64_t rows, int64_t dim, const float* alpha);
#if defined(__x86_64__) || defined(_M_X64)
void epilogue_f32_avx2(const TileArgs& args);
void rescale_rows_avx2(float* acc, int64_t rows, int64_t dim, const float* alpha);
void epilogue_f32_avx512(const TileArgs& args);
void rescale_rows_avx512(float* acc, int64_t rows, int64_t dim, const float* alpha);
#endif

}  // namespace cpu_kernels
}  // namespace dcq_ops
