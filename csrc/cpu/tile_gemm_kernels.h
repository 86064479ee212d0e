// The package's own fp32 GEMMs for the two products of a CPU queue-pass tile,
// once per instruction set, each in its own translation unit that includes no
// torch header (for the reason given in epilogue_kernels.h). cpu/tile_gemm.cpp
// chooses, once per process, between them and ATen's BLAS.
//
// Both are blocked the same way: a 6 x 64 block of the output lives in 24
// AVX-512 registers while the reduction runs over a packed, L1-resident panel
// of the other operand (64 columns x 128 of the reduction), so every load of
// the panel feeds six FMAs and every broadcast of the row operand four.
#pragma once

#include <cstdint>

namespace dcq_ops {
namespace cpu_kernels {

// Floats of scratch the kernels need for a reduction/embedding dimension `dim`
// (one packed panel), per calling thread.
int64_t tile_gemm_scratch_floats(int64_t dim);

#if defined(__x86_64__) || defined(_M_X64)
// logits[i, j] = sum_d q[i, d] * w[j, d]   (rows x cols, row strides ldq, ldw, ldl)
void tile_logits_avx512(int64_t rows, int64_t cols, int64_t dim, const float* q, int64_t ldq, const float* w,
                        int64_t ldw, float* logits, int64_t ldl, float* scratch);
// acc[i, d] += sum_j p[i, j] * w[j, d]     (rows x dim, row strides ldp, ldw, ldacc)
void tile_accumulate_avx512(int64_t rows, int64_t cols, int64_t dim, const float* p, int64_t ldp, const float* w,
                            int64_t ldw, float* acc, int64_t ldacc, float* scratch);
#endif

}  // namespace cpu_kernels
}  // namespace dcq_ops
