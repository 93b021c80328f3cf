// Per-element optimizer math (pagedopt/functional/reference.py performs the same float32
// operations in the same order). Each algorithm updates its states in place and returns the
// update direction d; the caller then applies
//     if (decay_factor != 1) p = p * decay_factor;   p = p - lr * (d * update_scale)
// and leaves everything untouched for skipped elements (see prepare_gradient).
//
// The value type T is float everywhere (CUDA kernels, portable CPU loops) except in the
// AVX-512 CPU kernels, which instantiate the same functions with a 16-lane float vector
// (native/cpu/simd_vec.h: lane-wise IEEE operations, a lane mask for bool), so every backend
// runs this one definition of the math. Data-dependent choices go through po_select and the
// po_* helpers, which that type overloads.
#pragma once
#include "common.h"

namespace pagedopt {

PO_HD float po_sqrt(float x) {
#ifdef PO_DEVICE_CODE
  return __fsqrt_rn(x);
#else
  return __builtin_sqrtf(x);
#endif
}

PO_HD bool po_isfinite(float x) { return (x - x) == 0.0f; }  // false for NaN and +-Inf

// torch.sign: +0 for +-0 and for NaN.
PO_HD float po_sign(float x) { return x > 0.0f ? 1.0f : (x < 0.0f ? -1.0f : 0.0f); }

PO_HD float po_select(bool c, float a, float b) { return c ? a : b; }

template <class T>
PO_HD T ema(float beta, T old, float one_minus_beta, T value) {
  return beta * old + one_minus_beta * value;
}

// x * scale for a per-step scale. Multiplying by exactly 1 returns x bit for bit (+-0,
// subnormals, infinities; x is never a signaling NaN where the result is kept), so the vector
// overload (simd_vec.h) skips it then; scalar code always multiplies (branch-free loops are
// what compilers vectorize).
PO_HD float po_scale(float x, float scale) { return x * scale; }

// keep, cleared where skip_zeros is set and g == 0.
PO_HD bool po_keep_nonzero(bool keep, float g, int32_t skip_zeros) { return keep & !((skip_zeros != 0) & (g == 0.0f)); }

// Skip rule and gradient preprocessing. Returns false when the element must stay unchanged
// (non-finite gradient, or exactly zero with skip_zeros); sets g to g * gnorm_scale
// (+ weight_decay * p for L2 decay), which callers must ignore when it returns false.
// (Written without short-circuit operators or early returns: branch-free code is what SIMD
// compilers vectorize; the CPU kernels compute g for skipped elements too and discard it.)
template <class T>
PO_HD auto prepare_gradient(T& g, T p, float gnorm_scale, const StepScalars& s) -> decltype(po_isfinite(g)) {
  const auto keep = po_keep_nonzero(po_isfinite(g), g, s.skip_zeros);
  g = po_scale(g, gnorm_scale);
  if (s.weight_decay != 0.0f) g = g + s.weight_decay * p;
  return keep;
}

// Adam's denominator. The bias corrections arrive as host-computed float32 reciprocals
// (StepScalars), so they cost a multiplication; the division by this denominator stays an
// IEEE division and sqrt stays correctly rounded.
template <class T>
PO_HD T adam_denominator(T v, const StepScalars& s) {
  return po_sqrt(v) * s.inv_bias_correction2_sqrt + s.eps;
}

// Per-algorithm updates. State layout: s0 = state1 (moment 0), s1 = state1 moment 1
// (AdEMAMix slow EMA) or state2, s2 = AdEMAMix state2. Unused slots are ignored.
template <int ALGO>
struct AlgoUpdate;

template <>
struct AlgoUpdate<ALGO_ADAM> {
  template <class T>
  static PO_HD T apply(T g, T& m, T& v, T&, const StepScalars& s) {
    m = ema(s.beta1, m, s.one_minus_beta1, g);
    v = ema(s.beta2, v, s.one_minus_beta2, g * g);
    return (m * s.inv_bias_correction1) / adam_denominator(v, s);
  }
};

template <>
struct AlgoUpdate<ALGO_ADEMAMIX> {
  template <class T>
  static PO_HD T apply(T g, T& m1, T& m2, T& v, const StepScalars& s) {
    m1 = ema(s.beta1, m1, s.one_minus_beta1, g);
    m2 = ema(s.beta3, m2, s.one_minus_beta3, g);
    v = ema(s.beta2, v, s.one_minus_beta2, g * g);
    return (m1 * s.inv_bias_correction1 + s.alpha * m2) / adam_denominator(v, s);
  }
};

template <>
struct AlgoUpdate<ALGO_MOMENTUM> {
  template <class T>
  static PO_HD T apply(T g, T& m, T&, T&, const StepScalars& s) {
    m = s.first_step ? g : s.beta1 * m + s.dampening_factor * g;
    return s.nesterov ? g + s.beta1 * m : m;
  }
};

template <>
struct AlgoUpdate<ALGO_LION> {
  template <class T>
  static PO_HD T apply(T g, T& m, T&, T&, const StepScalars& s) {
    const T d = po_sign(ema(s.beta1, m, s.one_minus_beta1, g));
    m = ema(s.beta2, m, s.one_minus_beta2, g);
    return d;
  }
};

template <>
struct AlgoUpdate<ALGO_RMSPROP> {
  template <class T>
  static PO_HD T apply(T g, T& v, T&, T&, const StepScalars& s) {
    v = ema(s.beta1, v, s.one_minus_beta1, g * g);
    return g / (po_sqrt(v) + s.eps);
  }
};

template <>
struct AlgoUpdate<ALGO_ADAGRAD> {
  template <class T>
  static PO_HD T apply(T g, T& v, T&, T&, const StepScalars& s) {
    v = v + g * g;
    return g / (po_sqrt(v) + s.eps);
  }
};

template <int ALGO, class T>
PO_HD T element_update(T g, T& s0, T& s1, T& s2, const StepScalars& s) {
  return AlgoUpdate<ALGO>::apply(g, s0, s1, s2, s);
}

// The reference skips the decay multiplication when decay_factor is exactly 1; multiplying by
// 1.0f returns p unchanged (every float, +-0, subnormals; NaN stays NaN and is quieted by the
// subtraction anyway), so po_scale's unconditional form is bit-identical too.
template <class T>
PO_HD T apply_direction(T p, T d, float update_scale, const StepScalars& s) {
  p = po_scale(p, s.decay_factor);
  return p - s.lr * po_scale(d, update_scale);
}

// Number of per-element state values (and which are signed) per algorithm.
template <int ALGO>
struct AlgoTraits {
  static constexpr int num_values = (ALGO == ALGO_ADEMAMIX) ? 3 : ((ALGO == ALGO_ADAM) ? 2 : 1);
  // value i uses the signed map?
  static constexpr PO_HD bool value_signed(int i) {
    if (ALGO == ALGO_ADAM) return i == 0;
    if (ALGO == ALGO_ADEMAMIX) return i < 2;
    return !(ALGO == ALGO_RMSPROP || ALGO == ALGO_ADAGRAD);
  }
};

}  // namespace pagedopt
