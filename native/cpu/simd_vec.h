// A 16-lane float vector for instantiating the shared per-element math
// (native/include/pagedopt/update.h) with AVX-512: every operator is the lane-wise IEEE float32
// operation of the scalar code (one rounding each, no contraction), comparisons give a lane
// mask, and the po_* helpers that update.h calls with data-dependent results are overloaded
// here. So a kernel written with VecF computes, lane for lane, exactly what the scalar
// definition computes - the same source, not a second copy of the math.
//
// Example (what the 8-bit kernels do per 16 elements):
//     VecF m = ..., v = ..., unused;
//     const VecF d = AlgoUpdate<ALGO_ADAM>::apply(g, m, v, unused, scalars);
#pragma once

#include "pagedopt/update.h"
#include "simd_avx512.h"

#ifdef PO_HAVE_AVX512
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

PO_ISA_BEGIN

// The float versions stay visible next to the vector overloads below.
using pagedopt::po_isfinite;
using pagedopt::po_keep_nonzero;
using pagedopt::po_scale;  // (and the UnitScale template)
using pagedopt::po_select;
using pagedopt::po_sign;
using pagedopt::po_sqrt;

// A lane mask (bool per lane).
struct VMask {
  __mmask16 k;
};

struct VecF {
  __m512 v;
  static VecF load(const float* p) { return VecF{_mm512_loadu_ps(p)}; }
  static VecF load(const float* p, __mmask16 live) { return VecF{_mm512_maskz_loadu_ps(live, p)}; }
  static VecF zero() { return VecF{_mm512_setzero_ps()}; }
};

inline __m512 po_broadcast(float x) { return _mm512_set1_ps(x); }

inline VecF operator+(VecF a, VecF b) { return VecF{_mm512_add_ps(a.v, b.v)}; }
inline VecF operator-(VecF a, VecF b) { return VecF{_mm512_sub_ps(a.v, b.v)}; }
inline VecF operator*(VecF a, VecF b) { return VecF{_mm512_mul_ps(a.v, b.v)}; }
inline VecF operator/(VecF a, VecF b) { return VecF{_mm512_div_ps(a.v, b.v)}; }
// Scalar operands keep their side (IEEE + and * commute exactly, but NaN payload choice
// follows the operand order on x86; the scalars are never NaN, still - same order as C).
inline VecF operator+(VecF a, float b) { return VecF{_mm512_add_ps(a.v, po_broadcast(b))}; }
inline VecF operator+(float a, VecF b) { return VecF{_mm512_add_ps(po_broadcast(a), b.v)}; }
inline VecF operator-(VecF a, float b) { return VecF{_mm512_sub_ps(a.v, po_broadcast(b))}; }
inline VecF operator-(float a, VecF b) { return VecF{_mm512_sub_ps(po_broadcast(a), b.v)}; }
inline VecF operator*(VecF a, float b) { return VecF{_mm512_mul_ps(a.v, po_broadcast(b))}; }
inline VecF operator*(float a, VecF b) { return VecF{_mm512_mul_ps(po_broadcast(a), b.v)}; }
inline VecF operator/(VecF a, float b) { return VecF{_mm512_div_ps(a.v, po_broadcast(b))}; }

// Ordered comparisons, false for NaN lanes (like the scalar operators).
inline VMask operator==(VecF a, float b) { return VMask{_mm512_cmp_ps_mask(a.v, po_broadcast(b), _CMP_EQ_OQ)}; }
inline VMask operator>(VecF a, float b) { return VMask{_mm512_cmp_ps_mask(a.v, po_broadcast(b), _CMP_GT_OQ)}; }
inline VMask operator<(VecF a, float b) { return VMask{_mm512_cmp_ps_mask(a.v, po_broadcast(b), _CMP_LT_OQ)}; }

inline VMask operator&(VMask a, VMask b) { return VMask{static_cast<__mmask16>(a.k & b.k)}; }
inline VMask operator&(bool a, VMask b) { return VMask{static_cast<__mmask16>(a ? b.k : 0)}; }
inline VMask operator!(VMask a) { return VMask{static_cast<__mmask16>(~a.k)}; }

inline VecF zero_like(VecF) { return VecF::zero(); }

inline VecF po_select(VMask c, VecF a, VecF b) { return VecF{_mm512_mask_blend_ps(c.k, b.v, a.v)}; }

// Correctly rounded, like sqrtf.
inline VecF po_sqrt(VecF x) { return VecF{_mm512_sqrt_ps(x.v)}; }

// False for NaN and +-Inf: vfpclassps classes QNaN (0x01), +Inf (0x08), -Inf (0x10), SNaN (0x80).
inline VMask po_isfinite(VecF x) { return VMask{static_cast<__mmask16>(~_mm512_fpclass_ps_mask(x.v, 0x99))}; }

// (A multiplication is one vector operation; comparing the scale with 1 and branching each
// time would cost more. Kernels pass UnitScale where they know the scale is 1.)
inline VecF po_scale(VecF x, float scale) { return x * scale; }

// The skip_zeros test costs a comparison and mask logic per vector; leave it out when off
// (a branch on a per-step scalar, or on a compile-time 0, see kernels.h PlainScalars).
inline VMask po_keep_nonzero(VMask keep, VecF g, int32_t skip_zeros) { return skip_zeros ? keep & !(g == 0.0f) : keep; }

// torch.sign: 1 for x > 0, -1 for x < 0, +0 otherwise (+-0 and NaN).
inline VecF po_sign(VecF x) {
  const __m512 one = _mm512_set1_ps(1.0f);
  __m512 r = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x.v, _mm512_setzero_ps(), _CMP_GT_OQ), one);
  return VecF{_mm512_mask_mov_ps(r, _mm512_cmp_ps_mask(x.v, _mm512_setzero_ps(), _CMP_LT_OQ), _mm512_set1_ps(-1.0f))};
}

PO_ISA_END

#pragma GCC diagnostic pop
#endif
