// Math shared by the CPU and CUDA kernels: the margin function, one step of
// the online log-sum-exp over a chunk of the queue, and the per-row finalisation
// of DESIGN.md §2. Everything here is scalar, fp32, and mirrors
// dcq_ops/reference.py line for line.
#pragma once

#include <cmath>
#include <limits>

#if defined(__CUDACC__)
#define DCQ_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define DCQ_HOST_DEVICE inline
#endif

namespace dcq_ops {

// Same constant as reference.MARGIN_THETA_EPS: below it the derivative of the
// margin is evaluated at theta = EPS (or pi - EPS), its finite limit.
constexpr float kMarginThetaEps = 1e-4f;
constexpr float kPi = 3.14159265358979323846f;

struct MarginParams {
  float scale;
  float m1, m2, m3;
  float filter_threshold;  // 0 = no inter-class filtering
  bool straight_through;   // gradient as if z = scale * c (arcface_torch's ArcFace)
};

DCQ_HOST_DEVICE float clamp_cosine(float c) { return fminf(fmaxf(c, -1.f), 1.f); }

// z = s * (cos(m1*acos(c) + m2) - m3)
DCQ_HOST_DEVICE float margin_logit(float c, const MarginParams& p) {
  const float theta = acosf(clamp_cosine(c));
  return p.scale * (cosf(p.m1 * theta + p.m2) - p.m3);
}

// dz/dc, exact away from c = +-1 and finite at +-1 (identically s for CosFace).
DCQ_HOST_DEVICE float margin_logit_derivative(float c, const MarginParams& p) {
  if (p.straight_through) return p.scale;
  float theta = acosf(clamp_cosine(c));
  theta = fminf(fmaxf(theta, kMarginThetaEps), kPi - kMarginThetaEps);
  return p.scale * p.m1 * sinf(p.m1 * theta + p.m2) / sinf(theta);
}

// Is queue entry (label qlabel) a negative of a row of class `label`?
DCQ_HOST_DEVICE bool is_excluded(long long label, long long qlabel) { return qlabel < 0 || qlabel == label; }

// The negative logit of a kept queue entry with cosine c; `filtered` tells
// whether it was zeroed by inter-class filtering (it then gets no gradient).
DCQ_HOST_DEVICE float negative_logit(float c, const MarginParams& p, bool* filtered) {
  *filtered = p.filter_threshold > 0.f && c > p.filter_threshold;
  return *filtered ? 0.f : p.scale * c;
}

// exp(a - b) with exp(-inf - -inf) defined as 1 (nothing seen yet, nothing to rescale).
DCQ_HOST_DEVICE float rescale_factor(float old_max, float new_max) {
  return new_max == -INFINITY ? 1.f : expf(old_max - new_max);
}

DCQ_HOST_DEVICE float softplus(float d) { return d > 0.f ? d + log1pf(expf(-d)) : log1pf(expf(d)); }
DCQ_HOST_DEVICE float sigmoid(float d) {
  return d >= 0.f ? 1.f / (1.f + expf(-d)) : expf(d) / (1.f + expf(d));
}

struct RowResult {
  float loss;          // softplus(lse_neg - z_pos)
  float coef_positive; // dloss/dc_pos  (multiplies w_i)
  float coef_negative; // multiplies the accumulator sum_j exp(z_ij - max)*W_j
};

// Finalise a row from its positive cosine and the online log-sum-exp state
// (max, sum) of its negatives. The positive's gradient factor 1 - p_i is the
// negatives' total probability sigmoid(lse_neg - z_pos), never 1 - p_i itself,
// which cancels to noise once p_i is close to 1.
DCQ_HOST_DEVICE RowResult finalize_row(float positive_cos, float row_max, float row_sum, const MarginParams& p) {
  RowResult r{0.f, 0.f, 0.f};
  if (!(row_sum > 0.f)) return r;  // every queue entry excluded: loss 0, gradient 0
  const float z_pos = margin_logit(positive_cos, p);
  const float lse_neg = row_max + logf(row_sum);
  const float d = lse_neg - z_pos;
  r.loss = softplus(d);
  r.coef_positive = -sigmoid(d) * margin_logit_derivative(positive_cos, p);
  // p_ij = exp(z_ij - lse_all) = exp(z_ij - max) * exp(max - lse_all); the
  // logit is s * c_ij, hence the extra factor s.
  const float lse_all = fmaxf(z_pos, lse_neg) + log1pf(expf(-fabsf(d)));
  r.coef_negative = p.scale * expf(row_max - lse_all);
  return r;
}

}  // namespace dcq_ops
