// The per-element and per-row math of the DCQ loss (docs/loss.md), shared by
// the CPU and CUDA kernels: the margin of the positive logit, the masks of a
// queue entry, the rescaling of the online log-sum-exp, and finalize_row.
// Scalar code, templated on the accumulation type T (float, or double for
// float64 inputs); the Python twin of the margin is dcq_ops/margin.py.
#pragma once

#include <cmath>
#include <limits>

#if defined(__CUDACC__)
#define DCQ_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define DCQ_HOST_DEVICE inline
#endif

namespace dcq_ops {

// Same constant as dcq_ops.margin.MARGIN_THETA_EPS: below it the derivative of
// the margin is evaluated at theta = EPS (or pi - EPS), its finite limit.
constexpr double kMarginThetaEps = 1e-4;
constexpr double kPi = 3.14159265358979323846;

// The loss's hyper-parameters, as the ops receive them (Python floats).
struct MarginParams {
  double scale;
  double m1, m2, m3;
  double interclass_filtering_threshold;  // 0 = no inter-class filtering
  bool straight_through_margin;           // gradient as if z = scale * c (arcface_torch's ArcFace)
};

// Overloads that pick the float or double function on host and device alike.
DCQ_HOST_DEVICE float dcq_acos(float x) { return acosf(x); }
DCQ_HOST_DEVICE double dcq_acos(double x) { return acos(x); }
DCQ_HOST_DEVICE float dcq_cos(float x) { return cosf(x); }
DCQ_HOST_DEVICE double dcq_cos(double x) { return cos(x); }
DCQ_HOST_DEVICE float dcq_sin(float x) { return sinf(x); }
DCQ_HOST_DEVICE double dcq_sin(double x) { return sin(x); }
DCQ_HOST_DEVICE float dcq_exp(float x) { return expf(x); }
DCQ_HOST_DEVICE double dcq_exp(double x) { return exp(x); }
DCQ_HOST_DEVICE float dcq_log(float x) { return logf(x); }
DCQ_HOST_DEVICE double dcq_log(double x) { return log(x); }
DCQ_HOST_DEVICE float dcq_log1p(float x) { return log1pf(x); }
DCQ_HOST_DEVICE double dcq_log1p(double x) { return log1p(x); }
DCQ_HOST_DEVICE float dcq_max(float a, float b) { return fmaxf(a, b); }
DCQ_HOST_DEVICE double dcq_max(double a, double b) { return fmax(a, b); }
DCQ_HOST_DEVICE float dcq_min(float a, float b) { return fminf(a, b); }
DCQ_HOST_DEVICE double dcq_min(double a, double b) { return fmin(a, b); }

// Clamp to [lo, hi] that keeps a NaN (fmin/fmax would map it to a bound, and a
// non-finite input to a finite loss).
template <typename T>
DCQ_HOST_DEVICE T clamp_keep_nan(T v, T lo, T hi) {
  return v < lo ? lo : (v > hi ? hi : v);
}

template <typename T>
DCQ_HOST_DEVICE T clamp_cosine(T c) {
  return clamp_keep_nan(c, T(-1), T(1));
}

// +0 for a finite v, NaN for an infinite or NaN one. Only a non-finite input
// makes a cosine non-finite, and adding this to a row's sum of exponentials
// makes that row NaN whatever the max and the exponential made of the value
// (exp(-inf) = 0 would hide a -inf, and inter-class filtering a +inf).
template <typename T>
DCQ_HOST_DEVICE T zero_or_nan(T v) {
  return v - v;
}

template <typename T>
DCQ_HOST_DEVICE bool is_finite(T v) {
  return zero_or_nan(v) == T(0);
}

// z = s * (cos(m1*acos(c) + m2) - m3)
template <typename T>
DCQ_HOST_DEVICE T margin_logit(T c, const MarginParams& p) {
  const T theta = dcq_acos(clamp_cosine(c));
  return T(p.scale) * (dcq_cos(T(p.m1) * theta + T(p.m2)) - T(p.m3));
}

// dz/dc, exact away from c = +-1 and finite at +-1 (identically s for CosFace).
template <typename T>
DCQ_HOST_DEVICE T margin_logit_derivative(T c, const MarginParams& p) {
  if (p.straight_through_margin) return T(p.scale);
  const T theta = clamp_keep_nan(dcq_acos(clamp_cosine(c)), T(kMarginThetaEps), T(kPi - kMarginThetaEps));
  return T(p.scale) * T(p.m1) * dcq_sin(T(p.m1) * theta + T(p.m2)) / dcq_sin(theta);
}

// Is a queue entry labelled `qlabel` left out of the loss of a row of class `label`?
// (an empty slot, or the row's own class: its only positive is its own class weight)
DCQ_HOST_DEVICE bool is_excluded(long long label, long long qlabel) { return qlabel < 0 || qlabel == label; }

// Inter-class filtering: a kept negative more similar than the threshold counts
// with logit 0 in the log-sum-exp and gets no gradient.
template <typename T>
DCQ_HOST_DEVICE bool is_filtered(T c, const MarginParams& p) {
  return p.interclass_filtering_threshold > 0 && c > T(p.interclass_filtering_threshold);
}

// exp(old_max - new_max), defined as 1 while nothing has been kept (both -inf).
template <typename T>
DCQ_HOST_DEVICE T rescale_factor(T old_max, T new_max) {
  return new_max == -std::numeric_limits<T>::infinity() ? T(1) : dcq_exp(old_max - new_max);
}

// Finalise a row from its positive cosine and the merged log-sum-exp state
// (max, sum) of its negatives. The positive's gradient factor 1 - p_i is the
// negatives' total probability sigmoid(lse_neg - z_pos), never 1 - p_i itself,
// which cancels to noise once p_i is close to 1.
template <typename T>
DCQ_HOST_DEVICE void finalize_row(T positive_cos, T row_max, T row_sum, const MarginParams& p, T* loss,
                                  T* coef_positive, T* coef_negative) {
  if (row_sum == T(0)) {
    // Every queue entry excluded: loss 0 and gradient 0, unless the row's own
    // embedding or class weight is not finite (its cosine is then NaN): NaN,
    // never a finite number. A kept non-finite entry made row_sum NaN instead.
    *loss = *coef_positive = *coef_negative = zero_or_nan(positive_cos);
    return;
  }
  const T z_pos = margin_logit(positive_cos, p);
  const T lse_neg = row_max + dcq_log(row_sum);
  const T d = lse_neg - z_pos;
  const T e = dcq_exp(-(d > T(0) ? d : -d));  // exp(-|d|) in (0, 1]
  const T log1p_e = dcq_log1p(e);
  *loss = (d > T(0) ? d : T(0)) + log1p_e;  // softplus(d), exact for confident rows (d << 0)
  const T sigmoid_d = d >= T(0) ? T(1) / (T(1) + e) : e / (T(1) + e);
  *coef_positive = -sigmoid_d * margin_logit_derivative(positive_cos, p);
  // p_ij = exp(z_ij - max) * exp(max - lse_all), and dz_ij/dc_ij = s.
  const T lse_all = dcq_max(z_pos, lse_neg) + log1p_e;
  *coef_negative = T(p.scale) * dcq_exp(row_max - lse_all);
}

}  // namespace dcq_ops
