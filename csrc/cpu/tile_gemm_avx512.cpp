// The tile GEMMs with AVX-512F (see tile_gemm_kernels.h): a 6 x 64 register
// block (24 accumulators) over panels packed into the caller's scratch.
//
//   logits = q w^T   the 64 queue slots of a panel are transposed into
//                    [dim][64] (16 x 16 in-register transposes), then every
//                    6-row block of q runs over it in steps of 128 dims;
//   acc += p w       128 slots x 64 dims of w are copied into [128][64] (rows
//                    of w are 4 KiB-aliased in L1 at common dims, a copy is
//                    not), then every 6-row block of p runs over them.
//
// Each output element is a sum over the reduction in index order, in fp32
// FMAs, per 128-long block, the blocks added in order: an ordinary fp32 dot
// product, within the error model every GEMM of the tests is held to.
#include "tile_gemm_kernels.h"

#include <algorithm>

namespace dcq_ops {
namespace cpu_kernels {

namespace {
constexpr int64_t kRowBlock = 6;     // rows of the register block
constexpr int64_t kPanel = 64;       // columns of the register block and of a packed panel
constexpr int64_t kReduction = 128;  // reduction steps per pass over a panel (32 KiB: L1)
}  // namespace

int64_t tile_gemm_scratch_floats(int64_t dim) { return kPanel * std::max(dim, kReduction); }

}  // namespace cpu_kernels
}  // namespace dcq_ops

#if defined(__x86_64__) || defined(_M_X64)

#include <immintrin.h>

#define DCQ_AVX512 __attribute__((target("avx512f")))

namespace dcq_ops {
namespace cpu_kernels {
namespace {

DCQ_AVX512 inline __mmask16 lanes(int64_t n) {
  return n >= 16 ? static_cast<__mmask16>(0xffff) : n <= 0 ? 0 : static_cast<__mmask16>((1u << n) - 1);
}

// c[r, 0:64] (+)= sum_k a[r * lda + k] * b[k * 64 + 0:64] for r < kRows; the
// columns beyond `cols` are neither read from nor written to c.
template <int kRows>
DCQ_AVX512 void block(int64_t steps, const float* a, int64_t lda, const float* b, float* c, int64_t ldc,
                      int64_t cols, bool accumulate) {
  static_assert(kRows >= 1 && kRows <= kRowBlock, "a register block has 1 to 6 rows");
  // Named registers, not an array: with an array GCC keeps the block in memory.
  __m512 c00, c01, c02, c03, c10, c11, c12, c13, c20, c21, c22, c23;
  __m512 c30, c31, c32, c33, c40, c41, c42, c43, c50, c51, c52, c53;
  c00 = c01 = c02 = c03 = c10 = c11 = c12 = c13 = c20 = c21 = c22 = c23 = _mm512_setzero_ps();
  c30 = c31 = c32 = c33 = c40 = c41 = c42 = c43 = c50 = c51 = c52 = c53 = _mm512_setzero_ps();
  const float* a0 = a;
  const float* a1 = a + lda;
  const float* a2 = a + 2 * lda;
  const float* a3 = a + 3 * lda;
  const float* a4 = a + 4 * lda;
  const float* a5 = a + 5 * lda;
  for (int64_t k = 0; k < steps; ++k, b += kPanel) {
    const __m512 b0 = _mm512_loadu_ps(b), b1 = _mm512_loadu_ps(b + 16);
    const __m512 b2 = _mm512_loadu_ps(b + 32), b3 = _mm512_loadu_ps(b + 48);
#define DCQ_ROW(r)                                   \
  if (kRows > r) {                                   \
    const __m512 x = _mm512_set1_ps(a##r[k]);        \
    c##r##0 = _mm512_fmadd_ps(x, b0, c##r##0);       \
    c##r##1 = _mm512_fmadd_ps(x, b1, c##r##1);       \
    c##r##2 = _mm512_fmadd_ps(x, b2, c##r##2);       \
    c##r##3 = _mm512_fmadd_ps(x, b3, c##r##3);       \
  }
    DCQ_ROW(0) DCQ_ROW(1) DCQ_ROW(2) DCQ_ROW(3) DCQ_ROW(4) DCQ_ROW(5)
#undef DCQ_ROW
  }
  const __mmask16 m0 = lanes(cols), m1 = lanes(cols - 16), m2 = lanes(cols - 32), m3 = lanes(cols - 48);
#define DCQ_STORE(r)                                                                   \
  if (kRows > r) {                                                                     \
    float* row = c + r * ldc;                                                          \
    if (accumulate) {                                                                  \
      c##r##0 = _mm512_add_ps(_mm512_maskz_loadu_ps(m0, row), c##r##0);                \
      c##r##1 = _mm512_add_ps(_mm512_maskz_loadu_ps(m1, row + 16), c##r##1);           \
      c##r##2 = _mm512_add_ps(_mm512_maskz_loadu_ps(m2, row + 32), c##r##2);           \
      c##r##3 = _mm512_add_ps(_mm512_maskz_loadu_ps(m3, row + 48), c##r##3);           \
    }                                                                                  \
    _mm512_mask_storeu_ps(row, m0, c##r##0);                                           \
    _mm512_mask_storeu_ps(row + 16, m1, c##r##1);                                      \
    _mm512_mask_storeu_ps(row + 32, m2, c##r##2);                                      \
    _mm512_mask_storeu_ps(row + 48, m3, c##r##3);                                      \
  }
  DCQ_STORE(0) DCQ_STORE(1) DCQ_STORE(2) DCQ_STORE(3) DCQ_STORE(4) DCQ_STORE(5)
#undef DCQ_STORE
}

// Every row of the output against one packed panel: rows in blocks of 6 (the
// last one shorter).
DCQ_AVX512 void rows_over_panel(int64_t rows, int64_t steps, const float* a, int64_t lda, const float* panel,
                                float* c, int64_t ldc, int64_t cols, bool accumulate) {
  int64_t i = 0;
  for (; i + kRowBlock <= rows; i += kRowBlock) {
    block<6>(steps, a + i * lda, lda, panel, c + i * ldc, ldc, cols, accumulate);
  }
  const float* ai = a + i * lda;
  float* ci = c + i * ldc;
  switch (rows - i) {
    case 1: return block<1>(steps, ai, lda, panel, ci, ldc, cols, accumulate);
    case 2: return block<2>(steps, ai, lda, panel, ci, ldc, cols, accumulate);
    case 3: return block<3>(steps, ai, lda, panel, ci, ldc, cols, accumulate);
    case 4: return block<4>(steps, ai, lda, panel, ci, ldc, cols, accumulate);
    case 5: return block<5>(steps, ai, lda, panel, ci, ldc, cols, accumulate);
    default: return;
  }
}

// dst[e, 0:16] = src[0:16, e] for e < 16: a 16 x 16 transpose in registers
// (pairs of floats, then pairs of pairs, then 128-bit lanes twice).
DCQ_AVX512 void transpose16(const float* src, int64_t lds, float* dst, int64_t ldd) {
  __m512 r[16], t[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(src + i * lds);
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {  // r[4i + e]: column 4L + e of rows 4i..4i+3, in 128-bit lane L
    const __m512d lo0 = _mm512_castps_pd(t[4 * i]), lo1 = _mm512_castps_pd(t[4 * i + 2]);
    const __m512d hi0 = _mm512_castps_pd(t[4 * i + 1]), hi1 = _mm512_castps_pd(t[4 * i + 3]);
    r[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(lo0, lo1));
    r[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(lo0, lo1));
    r[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(hi0, hi1));
    r[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(hi0, hi1));
  }
  for (int e = 0; e < 4; ++e) {
    const __m512 even01 = _mm512_shuffle_f32x4(r[e], r[4 + e], 0x88);  // lanes 0, 2 of row groups 0, 1
    const __m512 odd01 = _mm512_shuffle_f32x4(r[e], r[4 + e], 0xdd);   // lanes 1, 3
    const __m512 even23 = _mm512_shuffle_f32x4(r[8 + e], r[12 + e], 0x88);
    const __m512 odd23 = _mm512_shuffle_f32x4(r[8 + e], r[12 + e], 0xdd);
    _mm512_storeu_ps(dst + (0 + e) * ldd, _mm512_shuffle_f32x4(even01, even23, 0x88));
    _mm512_storeu_ps(dst + (8 + e) * ldd, _mm512_shuffle_f32x4(even01, even23, 0xdd));
    _mm512_storeu_ps(dst + (4 + e) * ldd, _mm512_shuffle_f32x4(odd01, odd23, 0x88));
    _mm512_storeu_ps(dst + (12 + e) * ldd, _mm512_shuffle_f32x4(odd01, odd23, 0xdd));
  }
}

// panel[d, j] = w[j, d] for j < cols (<= 64), d < dim; 0 for cols <= j < 64.
// Whole 16 x 16 blocks by transposes in registers, the rest element by element.
DCQ_AVX512 void pack_transposed(const float* w, int64_t ldw, int64_t cols, int64_t dim, float* panel) {
  const int64_t full_dims = dim / 16 * 16;
  for (int64_t j = 0; j < kPanel; j += 16) {
    const int64_t block_cols = std::clamp<int64_t>(cols - j, 0, 16);
    const int64_t transposed_dims = block_cols == 16 ? full_dims : 0;
    for (int64_t d = 0; d < transposed_dims; d += 16) {
      transpose16(w + j * ldw + d, ldw, panel + d * kPanel + j, kPanel);
    }
    for (int64_t d = transposed_dims; d < dim; ++d) {
      float* out = panel + d * kPanel + j;
      for (int64_t e = 0; e < block_cols; ++e) out[e] = w[(j + e) * ldw + d];
      for (int64_t e = block_cols; e < 16; ++e) out[e] = 0.f;
    }
  }
}

// panel[k, e] = w[k, e] for k < steps, e < cols (<= 64); 0 for cols <= e < 64.
DCQ_AVX512 void pack_rows(const float* w, int64_t ldw, int64_t steps, int64_t cols, float* panel) {
  const __mmask16 m0 = lanes(cols), m1 = lanes(cols - 16), m2 = lanes(cols - 32), m3 = lanes(cols - 48);
  for (int64_t k = 0; k < steps; ++k, w += ldw, panel += kPanel) {
    _mm512_storeu_ps(panel, _mm512_maskz_loadu_ps(m0, w));
    _mm512_storeu_ps(panel + 16, _mm512_maskz_loadu_ps(m1, w + 16));
    _mm512_storeu_ps(panel + 32, _mm512_maskz_loadu_ps(m2, w + 32));
    _mm512_storeu_ps(panel + 48, _mm512_maskz_loadu_ps(m3, w + 48));
  }
}

}  // namespace

DCQ_AVX512 void tile_logits_avx512(int64_t rows, int64_t cols, int64_t dim, const float* q, int64_t ldq,
                                   const float* w, int64_t ldw, float* logits, int64_t ldl, float* scratch) {
  for (int64_t j = 0; j < cols; j += kPanel) {
    const int64_t panel_cols = std::min(kPanel, cols - j);
    pack_transposed(w + j * ldw, ldw, panel_cols, dim, scratch);
    if (dim == 0) {  // an empty sum: zeros
      for (int64_t i = 0; i < rows; ++i) std::fill(logits + i * ldl + j, logits + i * ldl + j + panel_cols, 0.f);
    }
    for (int64_t d = 0; d < dim; d += kReduction) {
      rows_over_panel(rows, std::min(kReduction, dim - d), q + d, ldq, scratch + d * kPanel, logits + j, ldl,
                      panel_cols, /*accumulate=*/d > 0);
    }
  }
}

DCQ_AVX512 void tile_accumulate_avx512(int64_t rows, int64_t cols, int64_t dim, const float* p, int64_t ldp,
                                       const float* w, int64_t ldw, float* acc, int64_t ldacc, float* scratch) {
  for (int64_t k = 0; k < cols; k += kReduction) {
    const int64_t steps = std::min(kReduction, cols - k);
    for (int64_t d = 0; d < dim; d += kPanel) {
      const int64_t panel_cols = std::min(kPanel, dim - d);
      pack_rows(w + k * ldw + d, ldw, steps, panel_cols, scratch);
      rows_over_panel(rows, steps, p + k, ldp, scratch, acc + d, ldacc, panel_cols, /*accumulate=*/true);
    }
  }
}

}  // namespace cpu_kernels
}  // namespace dcq_ops

#endif
