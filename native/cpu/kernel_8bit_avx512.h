// The 8-bit kernel of the avx512 level (included by kernels.h, which holds the portable one).
//
// Per 256-element chunk (one absmax block), in one sweep over groups of 64 elements:
//   * the update: update.h's math instantiated on 16-lane vectors (simd_vec.h), reading the
//     states dequantized at the start of the chunk and the parameter and gradient, writing
//     the parameter and the new float32 states (into a chunk buffer), and folding the new
//     states into per-lane block maxima;
//   * interleaved with it, the requantization of the *previous* chunk, whose block scale is
//     known by then. The update waits on the divider (sqrt and one division per element);
//     the code search on the other vector ports, so the two overlap instead of running back
//     to back. The search is the bucket table (a gather per 16 values, simd_avx512.h), or on
//     CPUs with VBMI the gather-free arithmetic search (code_arith.h, simd_vbmi.h): the unit
//     is compiled twice (kernel_8bit_unit.h), and kernels.h picks the copy per call.
// The result is the same as the portable loops' (and the reference's), bit for bit: the
// same operations per element, maxima as integer bit patterns (order independent), and the
// prepare mode's float64 sums in the same lane order.
#pragma once

#ifdef PO_HAVE_AVX512
#include <type_traits>

#include "simd_vbmi.h"
#include "simd_vec.h"

PO_ISA_BEGIN
namespace avx512 {

// How one state value of one chunk is requantized (quant.h normalize()).
struct Requant {
  enum Kind { kZero, kMultiplyBounded, kMultiply, kDivide };
  Kind kind;
  float absmax;
  float inv_absmax;
};

// bounded: absmax is the scale of exactly these values (block-wise), so |x * inv| <= 1.
inline Requant requant_for(float absmax, bool bounded) {
  if (uses_reciprocal(absmax)) {
    return Requant{bounded ? Requant::kMultiplyBounded : Requant::kMultiply, absmax, absmax_reciprocal(absmax)};
  }
  return Requant{absmax > 0.0f ? Requant::kDivide : Requant::kZero, absmax, 0.0f};  // 0 or NaN: all zero
}

inline __mmask16 lanes16(int64_t n) { return n >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << n) - 1u); }
inline __mmask64 lanes64(int64_t n) { return n >= 64 ? ~static_cast<__mmask64>(0) : ((static_cast<__mmask64>(1) << n) - 1); }

// Running block scale of one state value (quant.h scale_weight()) as integer maxima: as int32
// the non-negative floats order by magnitude above every negative one; as uint32 the negative
// floats order by magnitude above every non-negative one.
template <bool SIGNED>
struct BlockMax {
  __m512i as_signed = _mm512_setzero_si512();
  __m512i as_unsigned = _mm512_setzero_si512();

  template <bool FULL>
  void add(VecF x, __mmask16 live) {
    const __m512i bits = _mm512_castps_si512(x.v);
    if (SIGNED) {
      as_signed = FULL ? _mm512_max_epi32(as_signed, bits) : _mm512_mask_max_epi32(as_signed, live, as_signed, bits);
      as_unsigned = FULL ? _mm512_max_epu32(as_unsigned, bits) : _mm512_mask_max_epu32(as_unsigned, live, as_unsigned, bits);
    } else {
      const __m512i magnitude = _mm512_and_si512(bits, _mm512_set1_epi32(0x7fffffff));
      as_unsigned = FULL ? _mm512_max_epu32(as_unsigned, magnitude)
                         : _mm512_mask_max_epu32(as_unsigned, live, as_unsigned, magnitude);
    }
  }

  // The block scale as float bits: max over x >= 0 and over -x * kNegativeWeight for x < 0
  // (monotone rounding: max(round(-x * w)) == round(max(-x) * w)); unsigned map: max |x|.
  uint32_t bits() const {
    const uint32_t top = static_cast<uint32_t>(_mm512_reduce_max_epu32(as_unsigned));
    if (!SIGNED) return top;
    const uint32_t pos = static_cast<uint32_t>(_mm512_reduce_max_epi32(as_signed));
    const uint32_t neg = (top >> 31) ? (top & 0x7fffffffu) : 0u;
    return max_u32(pos, float_bits(bits_float(neg) * kNegativeWeight));
  }
};

// Fixed-lane float64 sums of squares (kLanes = 8 lanes; element i of a chunk goes to lane i % 8
// in increasing i, like accumulate_squares()). x * x is exact in float64, so one fused
// multiply-add rounds exactly like the product followed by the sum.
inline __m512d add_squares(__m512d lanes, VecF x) {
  const __m512d lo = _mm512_cvtps_pd(_mm512_castps512_ps256(x.v));
  const __m512d hi = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(x.v), 1)));
  lanes = _mm512_fmadd_pd(lo, lo, lanes);
  return _mm512_fmadd_pd(hi, hi, lanes);
}

#define PO_UNIT_VBMI 0
#define PO_UNIT_NS avx512
#include "kernel_8bit_unit.h"
#undef PO_UNIT_VBMI
#undef PO_UNIT_NS

}  // namespace avx512

// The same unit compiled for VBMI CPUs (code_arith.h: no gather in the code search).
#pragma GCC push_options
#pragma GCC target("avx512vbmi")
namespace avx512_vbmi {
using namespace avx512;  // the shared pieces above; this namespace's own copies hide the rest
#define PO_UNIT_VBMI 1
#define PO_UNIT_NS avx512_vbmi
#include "kernel_8bit_unit.h"
#undef PO_UNIT_VBMI
#undef PO_UNIT_NS
}  // namespace avx512_vbmi
#pragma GCC pop_options

PO_ISA_END
#endif
