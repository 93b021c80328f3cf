// AVX2 versions of the 8-bit state's table lookups for the avx2 level (isa.h): the code search
// (code_lut.h lut_quantize_value(), lane for lane) and the dequantization (qmap[code] *
// absmax), with explicit gathers. GCC's generic tuning (-mtune=generic, right for a wheel that
// runs on every x86-64 CPU) never emits gathers by itself, so without these the avx2 level
// would look up one value at a time. Same integer table, same products: the same bits.
#pragma once

#if defined(__AVX2__) && !defined(PO_HAVE_AVX512)
#define PO_HAVE_AVX2 1
#include <immintrin.h>

#include "isa.h"
#include "pagedopt/code_lut.h"
#include "tables.h"

PO_ISA_BEGIN
namespace avx2 {

// Codes of 8 normalized values, one per 32-bit lane.
template <bool SIGNED>
inline __m256i quantize8(__m256 q) {
  typedef CodeLut<SIGNED> L;
  const uint32_t* table = SIGNED ? g_tables.lut_signed : g_tables.lut_unsigned;
  q = _mm256_max_ps(_mm256_min_ps(q, _mm256_set1_ps(1.0f)), _mm256_set1_ps(-1.0f));  // NaN -> 1 (clamp_unit)
  const __m256i bits = _mm256_castps_si256(q);
  const __m256i magnitude = _mm256_and_si256(bits, _mm256_set1_epi32(0x7fffffff));
  const __m256i negative = _mm256_srai_epi32(bits, 31);
  const __m256i index = _mm256_srli_epi32(SIGNED ? bits : magnitude, L::kShift);
  const __m256i entry = _mm256_i32gather_epi32(reinterpret_cast<const int*>(table), index, 4);
  const __m256i x_low = _mm256_and_si256(_mm256_xor_si256(bits, negative), _mm256_set1_epi32(static_cast<int>(L::kLowMask)));
  const __m256i code = _mm256_srli_epi32(_mm256_add_epi32(x_low, entry), 24);
  if (SIGNED) {  // +-0: the zero code
    const __m256i zero = _mm256_cmpeq_epi32(magnitude, _mm256_setzero_si256());
    return _mm256_blendv_epi8(code, _mm256_set1_epi32(kSignedZeroCode), zero);
  }
  return _mm256_and_si256(code, _mm256_cmpgt_epi32(bits, _mm256_setzero_si256()));  // x <= 0: code 0
}

// codes[i] of x[i] * inv_absmax for i < n.
template <bool SIGNED>
inline void quantize_scaled(const float* x, int64_t n, float inv_absmax, uint8_t* codes) {
  alignas(32) uint32_t local[8];
  const __m256 scale = _mm256_set1_ps(inv_absmax);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256i c = quantize8<SIGNED>(_mm256_mul_ps(_mm256_loadu_ps(x + i), scale));
    // 8 codes (< 256) to 8 bytes: pack to 16 then 8 bits within each 128-bit half, then join.
    const __m128i lo = _mm256_castsi256_si128(c), hi = _mm256_extracti128_si256(c, 1);
    const __m128i words = _mm_packus_epi32(lo, hi);
    _mm_storel_epi64(reinterpret_cast<__m128i*>(codes + i), _mm_packus_epi16(words, words));
  }
  if (i < n) {
    const int64_t rest = n - i;
    alignas(32) float tail[8] = {0};
    for (int64_t k = 0; k < rest; ++k) tail[k] = x[i + k];
    _mm256_store_si256(reinterpret_cast<__m256i*>(local), quantize8<SIGNED>(_mm256_mul_ps(_mm256_load_ps(tail), scale)));
    for (int64_t k = 0; k < rest; ++k) codes[i + k] = static_cast<uint8_t>(local[k]);
  }
}

// out[i] = qmap[codes[i]] * absmax for i < n.
template <bool SIGNED>
inline void dequantize(const uint8_t* codes, int64_t n, float absmax, float* out) {
  const float* qmap = SIGNED ? g_tables.qmap_signed : g_tables.qmap_unsigned;
  const __m256 scale = _mm256_set1_ps(absmax);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    int64_t packed;
    __builtin_memcpy(&packed, codes + i, 8);
    const __m256i index = _mm256_cvtepu8_epi32(_mm_cvtsi64_si128(packed));
    _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_i32gather_ps(qmap, index, 4), scale));
  }
  for (; i < n; ++i) out[i] = qmap[codes[i]] * absmax;
}

}  // namespace avx2
PO_ISA_END

#endif
