// Fast-numerics per-element math of the CUDA optimizer kernels (numerics="fast", the CUDA
// default). The strict kernels use native/include/pagedopt/update.h instead, bit for bit
// equal to the CPU kernels and the pure-torch reference; this file is CUDA-only.
//
// What is faster here, and why it stays accurate (issue 13: the strict 8-bit kernel spends
// ~170 instructions per element and reaches under half of the copy bandwidth):
//   * every multiply-add is one explicit fused multiply-add (__fmaf_rn: one rounding instead
//     of two). Written out rather than left to --fmad=true, so the operation order is fixed
//     and tests/fast_numerics.py can replay it exactly on the CPU;
//   * square roots use the hardware approximation (sqrt.approx.f32, relative error at most
//     2^-23 by the PTX ISA) instead of the correctly rounded sequence;
//   * the divisions by an optimizer denominator use __fdividef (one reciprocal approximation
//     and a multiply, 2 ulp for 2^-126 <= |d| <= 2^126). Safe there: the denominators are
//     sqrt(v) * c + eps with v < 2^128, so |d| < 2^126 for any finite v, and d = +inf (v = inf)
//     gives 0 like IEEE division; only eps = 0 with a subnormal denominator differs (the
//     quotient overflows to inf instead of a huge finite value);
//   * dequantization decodes the dynamic map arithmetically (fast_code_value): no table
//     lookup, so no shared-memory bank conflicts. It matches qmap[code] to a few ulp (checked
//     for all 256 codes by the tests), far inside the 8-bit quantization step.
// Quantization itself (normalization with the per-block reciprocal, the code search of
// qsearch.cuh) is the exact, branch-free search of the strict kernels: the codes of the
// fast kernels differ from the reference's only where the fast float values straddle a
// decision threshold.
//
// Tolerances and drift bounds are stated and tested in tests/test_fast_numerics.py.
#pragma once
#include "pagedopt/common.h"
#include "pagedopt/update.h"
#include "tiling.cuh"

namespace pagedopt {
namespace cuda {

__device__ __forceinline__ float fast_sqrt(float x) {
  float r;
  asm("sqrt.approx.f32 %0, %1;" : "=f"(r) : "f"(x));
  return r;
}

__device__ __forceinline__ float fast_div(float a, float b) { return __fdividef(a, b); }

// beta * old + one_minus_beta * value, with one fused multiply-add.
__device__ __forceinline__ float fast_ema(float beta, float old, float one_minus_beta, float value) {
  return __fmaf_rn(beta, old, __fmul_rn(one_minus_beta, value));
}

// Adam's denominator sqrt(v) * inv_bias_correction2_sqrt + eps.
__device__ __forceinline__ float fast_adam_denominator(float v, const StepScalars& s) {
  return __fmaf_rn(fast_sqrt(v), s.inv_bias_correction2_sqrt, s.eps);
}

template <int ALGO>
struct FastUpdate;

template <>
struct FastUpdate<ALGO_ADAM> {
  static __device__ __forceinline__ float apply(float g, float& m, float& v, float&, const StepScalars& s) {
    m = fast_ema(s.beta1, m, s.one_minus_beta1, g);
    v = __fmaf_rn(s.beta2, v, __fmul_rn(__fmul_rn(s.one_minus_beta2, g), g));
    return fast_div(__fmul_rn(m, s.inv_bias_correction1), fast_adam_denominator(v, s));
  }
};

template <>
struct FastUpdate<ALGO_ADEMAMIX> {
  static __device__ __forceinline__ float apply(float g, float& m1, float& m2, float& v, const StepScalars& s) {
    m1 = fast_ema(s.beta1, m1, s.one_minus_beta1, g);
    m2 = fast_ema(s.beta3, m2, s.one_minus_beta3, g);
    v = __fmaf_rn(s.beta2, v, __fmul_rn(__fmul_rn(s.one_minus_beta2, g), g));
    const float numerator = __fmaf_rn(s.alpha, m2, __fmul_rn(m1, s.inv_bias_correction1));
    return fast_div(numerator, fast_adam_denominator(v, s));
  }
};

template <>
struct FastUpdate<ALGO_MOMENTUM> {
  static __device__ __forceinline__ float apply(float g, float& m, float&, float&, const StepScalars& s) {
    m = s.first_step ? g : __fmaf_rn(s.beta1, m, __fmul_rn(s.dampening_factor, g));
    return s.nesterov ? __fmaf_rn(s.beta1, m, g) : m;
  }
};

template <>
struct FastUpdate<ALGO_LION> {
  static __device__ __forceinline__ float apply(float g, float& m, float&, float&, const StepScalars& s) {
    const float d = po_sign(fast_ema(s.beta1, m, s.one_minus_beta1, g));
    m = fast_ema(s.beta2, m, s.one_minus_beta2, g);
    return d;
  }
};

template <>
struct FastUpdate<ALGO_RMSPROP> {
  static __device__ __forceinline__ float apply(float g, float& v, float&, float&, const StepScalars& s) {
    v = __fmaf_rn(s.beta1, v, __fmul_rn(__fmul_rn(s.one_minus_beta1, g), g));
    return fast_div(g, __fadd_rn(fast_sqrt(v), s.eps));
  }
};

template <>
struct FastUpdate<ALGO_ADAGRAD> {
  static __device__ __forceinline__ float apply(float g, float& v, float&, float&, const StepScalars& s) {
    v = __fmaf_rn(g, g, v);
    return fast_div(g, __fadd_rn(fast_sqrt(v), s.eps));
  }
};

// prepare_gradient (update.h) with the L2 term fused: g = g * gnorm_scale + wd * p.
__device__ __forceinline__ bool fast_prepare_gradient(float& g, float p, float gnorm_scale, const StepScalars& s) {
  const bool keep = po_keep_nonzero(po_isfinite(g), g, s.skip_zeros);
  g = __fmul_rn(g, gnorm_scale);
  if (s.weight_decay != 0.0f) g = __fmaf_rn(s.weight_decay, p, g);
  return keep;
}

// apply_direction (update.h) fused: p * decay_factor - lr * (d * update_scale).
__device__ __forceinline__ float fast_apply_direction(float p, float d, float update_scale, const StepScalars& s) {
  return __fmaf_rn(-s.lr, __fmul_rn(d, update_scale), __fmul_rn(p, s.decay_factor));
}

// --- the per-element functor, by numerics mode ------------------------------------------------

enum Numerics : int { NUMERICS_STRICT = 0, NUMERICS_FAST = 1 };

template <int ALGO, int NUM>
__device__ __forceinline__ bool numerics_prepare_gradient(float& g, float p, float gnorm_scale, const StepScalars& s) {
  if constexpr (NUM == NUMERICS_FAST) return fast_prepare_gradient(g, p, gnorm_scale, s);
  return prepare_gradient(g, p, gnorm_scale, s);
}

template <int ALGO, int NUM>
__device__ __forceinline__ float numerics_update(float g, float& s0, float& s1, float& s2, const StepScalars& s) {
  if constexpr (NUM == NUMERICS_FAST) return FastUpdate<ALGO>::apply(g, s0, s1, s2, s);
  return element_update<ALGO>(g, s0, s1, s2, s);
}

template <int NUM>
__device__ __forceinline__ float numerics_apply_direction(float p, float d, float update_scale, const StepScalars& s) {
  if constexpr (NUM == NUMERICS_FAST) return fast_apply_direction(p, d, update_scale, s);
  return apply_direction(p, d, update_scale, s);
}

// --- arithmetic decoding of the dynamic map ----------------------------------------------------
//
// The dynamic map (pagedopt/functional/qmap.py): for exponent level i = 0..6 the midpoints
// of linspace(0.1, 1, n + 1) scaled by 10^(i - 6), n = 2^i values per sign (signed map) or
// 2^(i + 1) (unsigned map), plus 0 and 1. Sorted, a nonzero code c < 255 is, with
//     signed:   t = c - 127 (c > 127) or 127 - c (c < 127), level = e, sign by side
//     unsigned: t = c + 1, level = e - 1
// where e = floor(log2 t) and k = t - 2^e, the value +-10^(level - 6) * (0.1 + 0.45 (2k + 1) 2^-e).
// 10^(level - 6) comes from lane `level` of the warp (pow10_of_lane), one shuffle.

// float32(10^(lane - 6)) for lanes 0..6 (other lanes: unused). Once per thread.
__device__ __forceinline__ float pow10_of_lane() {
  const int lane = lane_id();
  float p = 1e-6f;
  p = lane == 1 ? 1e-5f : p;
  p = lane == 2 ? 1e-4f : p;
  p = lane == 3 ? 1e-3f : p;
  p = lane == 4 ? 1e-2f : p;
  p = lane == 5 ? 1e-1f : p;
  p = lane == 6 ? 1.0f : p;
  return p;
}

// The map value of `code` (all 32 lanes must call it together: one warp shuffle).
__device__ __forceinline__ float fast_code_value(int code, bool is_signed, float pow10_lane) {
  const bool negative = is_signed && code < kSignedZeroCode;
  int t = is_signed ? (negative ? kSignedZeroCode - code : code - kSignedZeroCode)  // 0..128
                    : code + 1;                                                        // 1..256
  t = max(t, 1);
  const int e = 31 - __clz(t);
  const int level = is_signed ? e : e - 1;
  const int k = t - (1 << e);
  const float inv_n = __int_as_float((127 - e) << 23);  // 2^-e, exact
  const float mid = __fmaf_rn(__fmul_rn(0.45f, (float)(2 * k + 1)), inv_n, 0.1f);
  const float scale = __shfl_sync(0xffffffffu, pow10_lane, max(level, 0));
  float value = __fmul_rn(mid, scale);
  value = code == (is_signed ? kSignedZeroCode : 0) ? 0.0f : value;
  value = code == 255 ? 1.0f : value;
  return negative ? -value : value;
}

}  // namespace cuda
}  // namespace pagedopt
