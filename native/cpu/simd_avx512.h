// AVX-512 versions of the 8-bit state hot loops (requantize, dequantize). They compute
// exactly what the portable loops in kernels.h compute (same integer table search, same
// normalization product); they exist because GCC's auto-vectorized code for these loops issues
// about twice the instructions. Compiled only when the target has AVX-512 F/BW/VL/DQ
// (and VBMI for the byte-table dequantization); kernels.h falls back otherwise.
#pragma once

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512DQ__)
#define PO_HAVE_AVX512 1
// GCC 12's AVX-512 headers trip -Wuninitialized on their own masked intrinsics (GCC bug
// 105593); the warnings are about the headers' placeholder operands, not this code.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

#include "pagedopt/code_lut.h"
#include "tables.h"

namespace pagedopt {
namespace cpu {
namespace avx512 {

// lut_quantize_value() (code_lut.h) for 16 lanes. BOUNDED: every |q| <= 1 (block-wise state
// in the reciprocal range: q = x * f32(1 / max|x|), see quant.h), so neither magnitudes above
// 1.0 nor NaN can occur. (|q| < 1 + 2^-6 would still be safe: such q share 1.0's bucket.)
template <bool SIGNED, bool BOUNDED>
inline __m512i quantize16(__m512 q, const uint32_t* table) {
  typedef CodeLut<SIGNED> L;
  const __m512i bits = _mm512_castps_si512(q);
  const __m512i magnitude = _mm512_and_si512(bits, _mm512_set1_epi32(0x7fffffff));
  const __m512i negative_mask = _mm512_srai_epi32(bits, 31);
  __m512i index = _mm512_max_epu32(magnitude, _mm512_set1_epi32(static_cast<int>(L::kFirst << L::kShift)));
  if (!BOUNDED) index = _mm512_min_epu32(index, _mm512_set1_epi32(0x3f800000));
  index = _mm512_sub_epi32(_mm512_srli_epi32(index, L::kShift), _mm512_set1_epi32(static_cast<int>(L::kFirst)));
  if (SIGNED) index = _mm512_add_epi32(index, _mm512_and_si512(negative_mask, _mm512_set1_epi32(static_cast<int>(L::kBuckets))));
  const __m512i entry = _mm512_i32gather_epi32(index, table, 4);
  // ((magnitude ^ negative_mask) & kLowMask) << 8: ternary logic 0x28 = (a ^ b) & c
  const __m512i x_low = _mm512_slli_epi32(
      _mm512_ternarylogic_epi32(magnitude, negative_mask, _mm512_set1_epi32(static_cast<int>(L::kLowMask)), 0x28), 8);
  const __mmask16 below = _mm512_cmplt_epu32_mask(entry, x_low);
  __m512i code = _mm512_mask_add_epi32(entry, below, entry, _mm512_set1_epi32(1));  // low byte = code
  if (!SIGNED) code = _mm512_andnot_si512(negative_mask, code);
  const __mmask16 zero = _mm512_testn_epi32_mask(magnitude, magnitude);
  code = _mm512_mask_mov_epi32(code, zero, _mm512_set1_epi32(SIGNED ? kSignedZeroCode : 0));
  if (!BOUNDED) {
    const __mmask16 nan = _mm512_cmpgt_epu32_mask(magnitude, _mm512_set1_epi32(0x7f800000));
    code = _mm512_mask_mov_epi32(code, nan, _mm512_set1_epi32(255));
  }
  return code;
}

// Codes of fresh[0..n) * inv_absmax (quant.h normalize() in the reciprocal range). BOUNDED:
// inv_absmax is the reciprocal of the block's own scale, so every |product| <= 1.
template <bool SIGNED, bool BOUNDED>
inline void requantize(const float* fresh, int64_t n, float inv_absmax, uint8_t* codes) {
  const uint32_t* table = SIGNED ? g_tables.lut_signed : g_tables.lut_unsigned;
  const __m512 scale = _mm512_set1_ps(inv_absmax);
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 live = n - i >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << (n - i)) - 1u);
    const __m512 q = _mm512_mul_ps(_mm512_maskz_loadu_ps(live, fresh + i), scale);
    _mm512_mask_cvtepi32_storeu_epi8(codes + i, live, quantize16<SIGNED, BOUNDED>(q, table));
  }
}

// Largest magnitude bits among the non-negative and among the negative x[0..n) (sign bit
// set); see max_scale_bits() in kernels.h.
inline void max_magnitude_bits_by_sign(const float* x, int64_t n, uint32_t* pos, uint32_t* neg) {
  const __m512i abs_mask = _mm512_set1_epi32(0x7fffffff);
  __m512i mp = _mm512_setzero_si512(), mn = _mm512_setzero_si512();
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 live = n - i >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << (n - i)) - 1u);
    const __m512i raw = _mm512_maskz_loadu_epi32(live, x + i);
    const __mmask16 negative = _mm512_movepi32_mask(raw) & live;
    const __m512i mag = _mm512_and_si512(raw, abs_mask);
    mp = _mm512_mask_max_epu32(mp, static_cast<__mmask16>(live & ~negative), mp, mag);
    mn = _mm512_mask_max_epu32(mn, negative, mn, mag);
  }
  *pos = static_cast<uint32_t>(_mm512_reduce_max_epu32(mp));
  *neg = static_cast<uint32_t>(_mm512_reduce_max_epu32(mn));
}

#ifdef __AVX512VBMI__
#define PO_HAVE_AVX512_VBMI 1

// out[i] = qmap[codes[i]] * absmax for i < n (dequantize_value, quant.h). Per 64 codes: each
// of the 4 bytes of the 64 map values comes from two 128-entry byte-table permutes; byte
// unpacking then assembles the floats. The unpacks work within 128-bit lanes, so the codes
// are first permuted (position 16L + 4j + t <- 16j + 4L + t) to make the floats come out in
// element order.
template <bool SIGNED>
inline void dequantize(const uint8_t* codes, int64_t n, float absmax, float* out) {
  const uint8_t(*planes)[256] = SIGNED ? g_tables.qmap_planes_signed : g_tables.qmap_planes_unsigned;
  __m512i table[4][4];
  for (int k = 0; k < 4; ++k) {
    for (int q = 0; q < 4; ++q) table[k][q] = _mm512_load_si512(planes[k] + 64 * q);
  }
  alignas(64) static const uint8_t kOrder[64] = {
      0, 1, 2, 3, 16, 17, 18, 19, 32, 33, 34, 35, 48, 49, 50, 51,
      4, 5, 6, 7, 20, 21, 22, 23, 36, 37, 38, 39, 52, 53, 54, 55,
      8, 9, 10, 11, 24, 25, 26, 27, 40, 41, 42, 43, 56, 57, 58, 59,
      12, 13, 14, 15, 28, 29, 30, 31, 44, 45, 46, 47, 60, 61, 62, 63};
  const __m512i order = _mm512_load_si512(kOrder);
  const __m512 scale = _mm512_set1_ps(absmax);
  for (int64_t i = 0; i < n; i += 64) {
    const __mmask64 live = n - i >= 64 ? ~static_cast<__mmask64>(0) : ((static_cast<__mmask64>(1) << (n - i)) - 1);
    const __m512i c = _mm512_permutexvar_epi8(order, _mm512_maskz_loadu_epi8(live, codes + i));
    const __mmask64 high = _mm512_movepi8_mask(c);
    __m512i b[4];
    for (int k = 0; k < 4; ++k) {
      const __m512i lo = _mm512_permutex2var_epi8(table[k][0], c, table[k][1]);
      const __m512i hi = _mm512_permutex2var_epi8(table[k][2], c, table[k][3]);
      b[k] = _mm512_mask_blend_epi8(high, lo, hi);
    }
    const __m512i w01_lo = _mm512_unpacklo_epi8(b[0], b[1]), w01_hi = _mm512_unpackhi_epi8(b[0], b[1]);
    const __m512i w23_lo = _mm512_unpacklo_epi8(b[2], b[3]), w23_hi = _mm512_unpackhi_epi8(b[2], b[3]);
    const __m512i d[4] = {_mm512_unpacklo_epi16(w01_lo, w23_lo), _mm512_unpackhi_epi16(w01_lo, w23_lo),
                          _mm512_unpacklo_epi16(w01_hi, w23_hi), _mm512_unpackhi_epi16(w01_hi, w23_hi)};
    for (int j = 0; j < 4; ++j) {
      const __mmask16 part = static_cast<__mmask16>(live >> (16 * j));
      _mm512_mask_storeu_ps(out + i + 16 * j, part, _mm512_mul_ps(_mm512_castsi512_ps(d[j]), scale));
    }
  }
}
#endif

}  // namespace avx512
}  // namespace cpu
}  // namespace pagedopt

#pragma GCC diagnostic pop
#endif
