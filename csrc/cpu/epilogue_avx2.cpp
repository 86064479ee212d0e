// The fp32 tile epilogue with AVX2 + FMA (+ F16C for fp16 rounding), 8 logits
// per instruction; the same two sweeps as epilogue_avx512.cpp (see
// epilogue_kernels.h for why it lives alone in this file).
#include "epilogue_kernels.h"

#if defined(__x86_64__) || defined(_M_X64)

#include <immintrin.h>

#include <cmath>
#include <limits>

#define DCQ_AVX2 __attribute__((target("avx2,fma,f16c")))

namespace dcq_ops {
namespace cpu_kernels {
namespace {

// exp(x), as exp_ps in epilogue_avx512.cpp (NaN stays NaN).
DCQ_AVX2 inline __m256 exp_ps(__m256 x) {
  const __m256 lowest = _mm256_set1_ps(-87.3365447505531f);
  const __m256 underflow = _mm256_cmp_ps(x, lowest, _CMP_LT_OQ);
  // The operand order keeps a NaN (min/max return their second operand then).
  x = _mm256_max_ps(lowest, _mm256_min_ps(_mm256_set1_ps(88.3762626647949f), x));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(underflow, _mm256_mul_ps(p, _mm256_castsi256_ps(bits)));
}

// All-ones lanes (as floats) of 8 queue slots that take part in the row's
// loss: not empty and not its class. `count` < 8 at the end of a row.
DCQ_AVX2 inline __m256 kept_lanes(const int64_t* queue_labels, __m256i label, int64_t count) {
  __m256i lo, hi;
  if (count >= 8) {
    lo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(queue_labels));
    hi = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(queue_labels + 4));
  } else {  // the tail: missing slots read as empty (-1)
    alignas(32) int64_t tail[8] = {-1, -1, -1, -1, -1, -1, -1, -1};
    for (int64_t t = 0; t < count; ++t) tail[t] = queue_labels[t];
    lo = _mm256_load_si256(reinterpret_cast<const __m256i*>(tail));
    hi = _mm256_load_si256(reinterpret_cast<const __m256i*>(tail + 4));
  }
  const __m256i minus_one = _mm256_set1_epi64x(-1);
  // excluded: label < 0 (i.e. not > -1) or label == the row's.
  const __m256i out_lo = _mm256_or_si256(_mm256_cmpeq_epi64(lo, label),
                                         _mm256_xor_si256(_mm256_cmpgt_epi64(lo, minus_one), minus_one));
  const __m256i out_hi = _mm256_or_si256(_mm256_cmpeq_epi64(hi, label),
                                         _mm256_xor_si256(_mm256_cmpgt_epi64(hi, minus_one), minus_one));
  // 64-bit masks to 32-bit lanes in order: pick the low dword of each 64-bit lane.
  const __m256 packed = _mm256_shuffle_ps(_mm256_castsi256_ps(out_lo), _mm256_castsi256_ps(out_hi), 0x88);
  const __m256 excluded = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(packed), 0xD8));
  return _mm256_xor_ps(excluded, _mm256_castsi256_ps(minus_one));
}

DCQ_AVX2 inline __m256i tail_mask(int64_t count) {
  const __m256i index = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(count < 8 ? count : 8)), index);
}

DCQ_AVX2 inline __m256 round_to(__m256 p, Rounding rounding) {
  if (rounding == Rounding::kBFloat16) {  // to nearest even on the upper 16 bits (p is finite, >= 0)
    __m256i bits = _mm256_castps_si256(p);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
    bits = _mm256_add_epi32(bits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff)));
    return _mm256_castsi256_ps(_mm256_and_si256(bits, _mm256_set1_epi32(static_cast<int>(0xffff0000u))));
  }
  if (rounding == Rounding::kHalf) {
    return _mm256_cvtph_ps(_mm256_cvtps_ph(p, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
  return p;
}

DCQ_AVX2 inline float reduce_max(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
  return _mm_cvtss_f32(m);
}

DCQ_AVX2 inline float reduce_add(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}

}  // namespace

DCQ_AVX2 void epilogue_f32_avx2(const TileArgs& a) {
  const __m256 scale = _mm256_set1_ps(a.scale);
  const __m256 threshold = _mm256_set1_ps(a.interclass_filtering_threshold);
  const bool filter = a.interclass_filtering_threshold > 0.f;
  const float minus_inf = -std::numeric_limits<float>::infinity();
  const __m256 vminus_inf = _mm256_set1_ps(minus_inf);
  const __m256 zero = _mm256_setzero_ps();
  for (int64_t i = 0; i < a.rows; ++i) {
    float* row = a.logits + i * a.cols;
    const __m256i label = _mm256_set1_epi64x(a.labels[i]);
    // Sweep 1: the max of the kept logits (a filtered one counts as 0).
    __m256 vmax = vminus_inf;
    for (int64_t j = 0; j < a.cols; j += 8) {
      const int64_t count = a.cols - j;
      const __m256 keep = kept_lanes(a.queue_labels + j, label, count);
      const __m256 c = _mm256_maskload_ps(row + j, tail_mask(count));
      __m256 z = _mm256_mul_ps(c, scale);
      if (filter) z = _mm256_andnot_ps(_mm256_cmp_ps(c, threshold, _CMP_GT_OQ), z);
      vmax = _mm256_max_ps(vmax, _mm256_blendv_ps(vminus_inf, z, keep));
    }
    const float new_max = std::fmax(a.row_max[i], reduce_max(vmax));
    const float reference = new_max == minus_inf ? 0.f : new_max;  // nothing kept yet: no -inf - -inf
    const __m256 ref = _mm256_set1_ps(reference);
    // Sweep 2: exp(z - new max) into the sum; into the row where the entry carries a gradient.
    __m256 vsum = _mm256_setzero_ps();
    for (int64_t j = 0; j < a.cols; j += 8) {
      const int64_t count = a.cols - j;
      const __m256i valid = tail_mask(count);
      const __m256 keep = kept_lanes(a.queue_labels + j, label, count);
      const __m256 c = _mm256_maskload_ps(row + j, valid);
      __m256 z = _mm256_mul_ps(c, scale);
      __m256 gradient = keep;
      if (filter) {
        const __m256 filtered = _mm256_cmp_ps(c, threshold, _CMP_GT_OQ);
        z = _mm256_andnot_ps(filtered, z);
        gradient = _mm256_andnot_ps(filtered, keep);
      }
      // + c * 0: NaN for a non-finite cosine, so that it makes the sum NaN (the
      // max skips a NaN, and exp(-inf) or filtering would hide an inf): one FMA.
      const __m256 e = _mm256_and_ps(keep, _mm256_fmadd_ps(c, zero, exp_ps(_mm256_sub_ps(z, ref))));
      vsum = _mm256_add_ps(vsum, e);
      _mm256_maskstore_ps(row + j, valid, round_to(_mm256_and_ps(gradient, e), a.rounding));
    }
    const float old_max = a.row_max[i];
    a.alpha[i] = new_max == minus_inf ? 1.f : std::exp(old_max - new_max);
    a.row_sum[i] = a.row_sum[i] * a.alpha[i] + reduce_add(vsum);
    a.row_max[i] = new_max;
  }
}

DCQ_AVX2 void rescale_rows_avx2(float* acc, int64_t rows, int64_t dim, const float* alpha) {
  for (int64_t i = 0; i < rows; ++i) {
    if (alpha[i] == 1.f) continue;  // most chunks do not raise the max
    const __m256 a = _mm256_set1_ps(alpha[i]);
    float* row = acc + i * dim;
    int64_t d = 0;
    for (; d + 8 <= dim; d += 8) _mm256_storeu_ps(row + d, _mm256_mul_ps(_mm256_loadu_ps(row + d), a));
    for (; d < dim; ++d) row[d] *= alpha[i];
  }
}

}  // namespace cpu_kernels
}  // namespace dcq_ops

#endif
