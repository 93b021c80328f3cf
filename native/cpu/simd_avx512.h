// AVX-512 versions of the 8-bit state hot loops (code search, dequantization). They compute
// exactly what the portable code in code_lut.h / kernels.h computes (same integer table
// search, same products); they exist because GCC's auto-vectorized code for these loops
// issues about twice the instructions. Compiled only at the avx512 level (F/BW/VL/DQ/CD, see
// isa.h); the VBMI dequantization is chosen at run time; kernels.h falls back otherwise.
#pragma once

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512DQ__)
#define PO_HAVE_AVX512 1
// GCC 12's AVX-512 headers trip -Wuninitialized on their own masked intrinsics (GCC bug
// 105593); the warnings are about the headers' placeholder operands, not this code.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

#include "isa.h"
#include "pagedopt/code_lut.h"
#include "tables.h"

PO_ISA_BEGIN
namespace avx512 {

// Code search for 16 normalized values (code_lut.h lut_quantize_value(), lane for lane): the
// code lands in the top byte of each 32-bit lane, see pack_codes(). BOUNDED: every |q| <= 1
// (block-wise state in the reciprocal range: q = x * f32(1 / max|x|), quant.h), so neither
// values beyond +-1 nor NaN occur and the clamp is skipped. The lanes the table cannot know
// (signed: +-0; unsigned: x <= 0) are left out of the gather and take their entry from
// `zero_entry` (code 127 resp. 0, no threshold: x_low never carries into it).
template <bool SIGNED, bool BOUNDED>
inline __m512i code_bits(__m512 q) {
  typedef CodeLut<SIGNED> L;
  const SearchConstants& k = g_tables.search[SIGNED ? 0 : 1];  // (see SearchConstants)
  const uint32_t* table = SIGNED ? g_tables.lut_signed : g_tables.lut_unsigned;
  if (!BOUNDED) q = _mm512_max_ps(_mm512_min_ps(q, _mm512_set1_ps(k.one)), _mm512_set1_ps(k.minus_one));  // NaN -> 1
  const __m512i bits = _mm512_castps_si512(q);
  const __m512i low_mask = _mm512_set1_epi32(static_cast<int>(k.low_mask));
  // Signed: bits >> kShift is the bucket, plus kNegativeOffset for x < 0. Unsigned: the lanes
  // with x <= 0 are not loaded, so no magnitude is needed.
  const __mmask16 known = SIGNED ? static_cast<__mmask16>(~_mm512_fpclass_ps_mask(q, 0x06))  // not +-0
                                 : _mm512_cmpgt_epi32_mask(bits, _mm512_setzero_si512());   // x > 0
  const __m512i entry = _mm512_mask_i32gather_epi32(_mm512_set1_epi32(static_cast<int>(k.zero_entry)), known,
                                                    _mm512_srli_epi32(bits, L::kShift), table, 4);
  // x_low: the low bits, complemented for x < 0 (ternary logic 0x28 = (a ^ b) & c)
  const __m512i x_low = SIGNED ? _mm512_ternarylogic_epi32(bits, _mm512_srai_epi32(bits, 31), low_mask, 0x28)
                               : _mm512_and_si512(bits, low_mask);
  return _mm512_add_epi32(x_low, entry);  // carries into the code byte when t < x
}

// The top bytes of four vectors of code_bits() (64 codes, in order) as one vector of bytes.
// (AVX-512 BW: the packs work per 128-bit lane, so lane L ends up holding dword L of each
// input; one dword permute puts them back in order.)
inline __m512i pack_codes(__m512i c0, __m512i c1, __m512i c2, __m512i c3) {
  const __m512i a = _mm512_packus_epi32(_mm512_srli_epi32(c0, 24), _mm512_srli_epi32(c1, 24));
  const __m512i b = _mm512_packus_epi32(_mm512_srli_epi32(c2, 24), _mm512_srli_epi32(c3, 24));
  const __m512i bytes = _mm512_packus_epi16(a, b);  // lane L: dwords c0[L], c1[L], c2[L], c3[L]
  return _mm512_permutexvar_epi32(_mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15), bytes);
}

// Codes of 16 normalized values, one per 32-bit lane (test hooks).
template <bool SIGNED, bool BOUNDED>
inline __m512i quantize16(__m512 q) {
  return _mm512_srli_epi32(code_bits<SIGNED, BOUNDED>(q), 24);
}

// out[i] = qmap[codes[i]] * absmax for i < n (dequantize_value, quant.h), AVX-512 VBMI (Intel
// Ice Lake and later, AMD Zen 4): per 64 codes, each of the 4 bytes of the 64 map values comes
// from two 128-entry byte-table permutes; byte unpacking then assembles the floats. The
// unpacks work within 128-bit lanes, so the codes are first permuted (position 16L + 4j + t
// <- 16j + 4L + t) to make the floats come out in element order. Compiled for VBMI by a
// function attribute (the level's own flags stop at F/BW/VL/DQ/CD); called only where the
// CPU has it (Tables::dequant_vbmi).
template <bool SIGNED>
__attribute__((target("avx512vbmi"), noinline)) void dequantize_vbmi(const uint8_t* codes, int64_t n, float absmax,
                                                                     float* out) {
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
    if (n - i >= 64) {  // plain stores: a masked store would not forward to the loads that follow
      for (int j = 0; j < 4; ++j) _mm512_storeu_ps(out + i + 16 * j, _mm512_mul_ps(_mm512_castsi512_ps(d[j]), scale));
    } else {
      for (int j = 0; j < 4; ++j) {
        const __mmask16 part = static_cast<__mmask16>(live >> (16 * j));
        _mm512_mask_storeu_ps(out + i + 16 * j, part, _mm512_mul_ps(_mm512_castsi512_ps(d[j]), scale));
      }
    }
  }
}

// The same with AVX-512 F only (Skylake/Cascade Lake servers): the 256 map values sit in 16
// registers; vpermt2ps looks up 32 of them per instruction (code bits 0-4), and code bits 5, 6
// and 7 pick among the 8 results with three levels of blends. No gather.
template <bool SIGNED>
__attribute__((noinline)) void dequantize_permute(const uint8_t* codes, int64_t n, float absmax, float* out) {
  const float* qmap = SIGNED ? g_tables.qmap_signed : g_tables.qmap_unsigned;
  __m512 t[16];
  for (int k = 0; k < 16; ++k) t[k] = _mm512_load_ps(qmap + 16 * k);
  const __m512 scale = _mm512_set1_ps(absmax);
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 live = n - i >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << (n - i)) - 1u);
    const __m512i c = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(live, codes + i));
    __m512 r[8];
    for (int k = 0; k < 8; ++k) r[k] = _mm512_permutex2var_ps(t[2 * k], c, t[2 * k + 1]);
    const __mmask16 b5 = _mm512_test_epi32_mask(c, _mm512_set1_epi32(32));
    const __mmask16 b6 = _mm512_test_epi32_mask(c, _mm512_set1_epi32(64));
    const __mmask16 b7 = _mm512_test_epi32_mask(c, _mm512_set1_epi32(128));
    __m512 a[4];
    for (int k = 0; k < 4; ++k) a[k] = _mm512_mask_blend_ps(b5, r[2 * k], r[2 * k + 1]);
    const __m512 lo = _mm512_mask_blend_ps(b6, a[0], a[1]);
    const __m512 hi = _mm512_mask_blend_ps(b6, a[2], a[3]);
    const __m512 v = _mm512_mul_ps(_mm512_mask_blend_ps(b7, lo, hi), scale);
    _mm512_mask_storeu_ps(out + i, live, v);
  }
}

template <bool SIGNED>
inline void dequantize(const uint8_t* codes, int64_t n, float absmax, float* out) {
  if (g_tables.dequant_vbmi) {
    dequantize_vbmi<SIGNED>(codes, n, absmax, out);
  } else {
    dequantize_permute<SIGNED>(codes, n, absmax, out);
  }
}

}  // namespace avx512
PO_ISA_END

#pragma GCC diagnostic pop
#endif
