// The fp32 tile epilogue with AVX-512F, 16 logits per instruction (see
// epilogue_kernels.h for why it lives alone in this file). Per row of the
// tile, two sweeps over the row while it is in L1: the max of the kept
// logits, then the exponentials, their sum and the probabilities, in place.
#include "epilogue_kernels.h"

#if defined(__x86_64__) || defined(_M_X64)

#include <immintrin.h>

#include <cmath>
#include <limits>

#define DCQ_AVX512 __attribute__((target("avx512f")))

namespace dcq_ops {
namespace cpu_kernels {
namespace {

// exp(x) for x <= 0 up to about 2 ulp: x = n ln2 + r with |r| <= ln2/2, e^r by
// Cephes' degree-6 polynomial, 2^n put into the exponent bits; 0 below the
// smallest normal float (the reference's subnormals there are below any
// tolerance that matters); NaN stays NaN.
DCQ_AVX512 inline __m512 exp_ps(__m512 x) {
  const __m512 lowest = _mm512_set1_ps(-87.3365447505531f);
  const __mmask16 underflow = _mm512_cmp_ps_mask(x, lowest, _CMP_LT_OQ);
  // The operand order keeps a NaN (min/max return their second operand then).
  x = _mm512_max_ps(lowest, _mm512_min_ps(_mm512_set1_ps(88.3762626647949f), x));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);  // ln2 in two parts: exact n * hi
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  const __m512i bits = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
  return _mm512_maskz_mul_ps(static_cast<__mmask16>(~underflow), p, _mm512_castsi512_ps(bits));
}

// Lanes of 16 queue slots that take part in the row's loss: not empty and not its class.
DCQ_AVX512 inline __mmask16 kept_lanes(const int64_t* queue_labels, __m512i label, __mmask16 valid) {
  const __mmask8 lo_valid = static_cast<__mmask8>(valid), hi_valid = static_cast<__mmask8>(valid >> 8);
  const __m512i lo = _mm512_maskz_loadu_epi64(lo_valid, queue_labels);
  const __m512i hi = _mm512_maskz_loadu_epi64(hi_valid, queue_labels + 8);
  const __m512i zero = _mm512_setzero_si512();
  const __mmask8 keep_lo = _mm512_cmpge_epi64_mask(lo, zero) & _mm512_cmpneq_epi64_mask(lo, label) & lo_valid;
  const __mmask8 keep_hi = _mm512_cmpge_epi64_mask(hi, zero) & _mm512_cmpneq_epi64_mask(hi, label) & hi_valid;
  return static_cast<__mmask16>(keep_lo | (static_cast<unsigned>(keep_hi) << 8));
}

DCQ_AVX512 inline __m512 round_to(__m512 p, Rounding rounding) {
  if (rounding == Rounding::kBFloat16) {  // to nearest even on the upper 16 bits (p is finite, >= 0)
    __m512i bits = _mm512_castps_si512(p);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    bits = _mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
    return _mm512_castsi512_ps(_mm512_and_si512(bits, _mm512_set1_epi32(static_cast<int>(0xffff0000u))));
  }
  if (rounding == Rounding::kHalf) {
    return _mm512_cvtph_ps(_mm512_cvtps_ph(p, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
  return p;
}

}  // namespace

DCQ_AVX512 void epilogue_f32_avx512(const TileArgs& a) {
  if (a.cols > kMaxCols) return epilogue_f32_default(a);  // wider than the driver's chunks (an explicit chunk_size)
  const __m512 scale = _mm512_set1_ps(a.scale);
  const __m512 threshold = _mm512_set1_ps(a.interclass_filtering_threshold);
  const bool filter = a.interclass_filtering_threshold > 0.f;
  const float minus_inf = -std::numeric_limits<float>::infinity();
  const __m512 zero = _mm512_setzero_ps();
  // The kept lanes of each group of 16 slots, found in sweep 1 and reused in sweep 2.
  __mmask16 kept[kMaxCols / 16];
  for (int64_t i = 0; i < a.rows; ++i) {
    float* row = a.logits + i * a.cols;
    const __m512i label = _mm512_set1_epi64(a.labels[i]);
    // Sweep 1: the max of the kept logits (a filtered one counts as 0).
    __m512 vmax = _mm512_set1_ps(minus_inf);
    for (int64_t j = 0; j < a.cols; j += 16) {
      const __mmask16 valid = a.cols - j >= 16 ? 0xffff : static_cast<__mmask16>((1u << (a.cols - j)) - 1);
      const __mmask16 keep = kept[j / 16] = kept_lanes(a.queue_labels + j, label, valid);
      const __m512 c = _mm512_maskz_loadu_ps(valid, row + j);
      __m512 z = _mm512_mul_ps(c, scale);
      if (filter) z = _mm512_mask_mov_ps(z, _mm512_cmp_ps_mask(c, threshold, _CMP_GT_OQ), _mm512_setzero_ps());
      vmax = _mm512_mask_max_ps(vmax, keep, vmax, z);
    }
    const float new_max = std::fmax(a.row_max[i], _mm512_reduce_max_ps(vmax));
    const float reference = new_max == minus_inf ? 0.f : new_max;  // nothing kept yet: no -inf - -inf
    const __m512 ref = _mm512_set1_ps(reference);
    // Sweep 2: exp(z - new max) into the sum; into the row where the entry carries a gradient.
    __m512 vsum = _mm512_setzero_ps();
    for (int64_t j = 0; j < a.cols; j += 16) {
      const __mmask16 valid = a.cols - j >= 16 ? 0xffff : static_cast<__mmask16>((1u << (a.cols - j)) - 1);
      const __mmask16 keep = kept[j / 16];
      const __m512 c = _mm512_maskz_loadu_ps(valid, row + j);
      __m512 z = _mm512_mul_ps(c, scale);
      __mmask16 gradient = keep;
      if (filter) {
        const __mmask16 filtered = _mm512_cmp_ps_mask(c, threshold, _CMP_GT_OQ);
        z = _mm512_mask_mov_ps(z, filtered, _mm512_setzero_ps());
        gradient = static_cast<__mmask16>(keep & ~filtered);
      }
      // + c * 0: NaN for a non-finite cosine, so that it makes the sum NaN (the
      // max skips a NaN, and exp(-inf) or filtering would hide an inf): one FMA.
      const __m512 e = _mm512_maskz_mov_ps(keep, _mm512_fmadd_ps(c, zero, exp_ps(_mm512_sub_ps(z, ref))));
      vsum = _mm512_add_ps(vsum, e);
      _mm512_mask_storeu_ps(row + j, valid, round_to(_mm512_maskz_mov_ps(gradient, e), a.rounding));
    }
    const float old_max = a.row_max[i];
    a.alpha[i] = new_max == minus_inf ? 1.f : std::exp(old_max - new_max);
    a.row_sum[i] = a.row_sum[i] * a.alpha[i] + _mm512_reduce_add_ps(vsum);
    a.row_max[i] = new_max;
  }
}

DCQ_AVX512 void rescale_rows_avx512(float* acc, int64_t rows, int64_t dim, const float* alpha) {
  for (int64_t i = 0; i < rows; ++i) {
    if (alpha[i] == 1.f) continue;  // most chunks do not raise the max
    const __m512 a = _mm512_set1_ps(alpha[i]);
    float* row = acc + i * dim;
    for (int64_t d = 0; d < dim; d += 16) {
      const __mmask16 valid = dim - d >= 16 ? 0xffff : static_cast<__mmask16>((1u << (dim - d)) - 1);
      _mm512_mask_storeu_ps(row + d, valid, _mm512_mul_ps(_mm512_maskz_loadu_ps(valid, row + d), a));
    }
  }
}

}  // namespace cpu_kernels
}  // namespace dcq_ops

#endif
