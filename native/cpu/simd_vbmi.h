// The code search without gathers (code_arith.h), 64 values at a time, for AVX-512 CPUs with
// VBMI (Intel Ice Lake and later, AMD Zen 4). Compiled for VBMI with a target pragma (the
// avx512 level's own flags stop at F/BW/VL/DQ/CD); called only where the CPU has it
// (Tables::code_search, see kernel_8bit_avx512.h).
//
// Per 16 values: ~13 vector operations for the guess g (exponent -> octave lookups, one
// compare, the decade's affine function, truncation), then, per 64 values, the thresholds
// t[g] are fetched with byte-table permutes (one per byte plane for the signed map's 128
// entries, two and a blend for the unsigned map's 256) after packing the four g vectors into
// one vector of bytes, and unpacked back to floats in the same lane order. Replaces one
// vpgatherdd per 16 values, which on Zen 4 costs more than all of that.
//
// search64_lattice() (code_lattice.h), the default where proven, skips the threshold fetch:
// floor(V) with one per-segment compare, and search64() for the rare group with a value
// within rounding distance of a threshold (7-11% faster 8-bit kernels on Zen 4).
#pragma once

#include "simd_lattice.h"  // (before the target pragma: the shared pieces need no VBMI)

#ifdef PO_HAVE_AVX512
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC push_options
#pragma GCC target("avx512vbmi")
#include <immintrin.h>

#include "code_arith.h"
#include "code_lattice.h"
#include "tables.h"

PO_ISA_BEGIN
namespace vbmi {
using namespace lattice512;  // segment16(), prepare16(), finish16(), pack4(), pack_codes64(), codes16(), load64()...

// g (code_arith.h arith_guess()) of 16 non-negative float bit patterns.
__attribute__((always_inline)) inline __m512i guess16(const ArithSearch& s, __m512i bits) {
  const __m512i segment = segment16(s.segment_low, s.boundary, bits);
  const __m512 w = _mm512_fmadd_ps(_mm512_castsi512_ps(bits), _mm512_permutexvar_ps(segment, _mm512_load_ps(s.scale)),
                                   _mm512_permutexvar_ps(segment, _mm512_load_ps(s.offset)));
  return _mm512_cvttps_epi32(w);
}

// Four byte vectors (byte k of each 32-bit value, in pack4() order) -> four vectors of 32-bit
// values in the order of pack4()'s inputs.
__attribute__((always_inline)) inline void unpack4(const __m512i b[4], __m512i out[4]) {
  const __m512i w01_lo = _mm512_unpacklo_epi8(b[0], b[1]), w01_hi = _mm512_unpackhi_epi8(b[0], b[1]);
  const __m512i w23_lo = _mm512_unpacklo_epi8(b[2], b[3]), w23_hi = _mm512_unpackhi_epi8(b[2], b[3]);
  out[0] = _mm512_unpacklo_epi16(w01_lo, w23_lo);
  out[1] = _mm512_unpackhi_epi16(w01_lo, w23_lo);
  out[2] = _mm512_unpacklo_epi16(w01_hi, w23_hi);
  out[3] = _mm512_unpackhi_epi16(w01_hi, w23_hi);
}

// t[g] for the 64 indexes of `index` (bytes, pack4() order): signed maps have 128 thresholds
// (the permute ignores bit 7), unsigned ones 256 (bit 7 picks the upper half).
template <bool SIGNED>
__attribute__((always_inline)) inline void fetch_thresholds(const ArithSearch& s, __m512i index, __m512i out[4]) {
  __m512i b[4];
  if (SIGNED) {
    for (int k = 0; k < 4; ++k) {
      b[k] = _mm512_permutex2var_epi8(_mm512_load_si512(s.planes[k]), index, _mm512_load_si512(s.planes[k] + 64));
    }
  } else {
    const __mmask64 upper = _mm512_movepi8_mask(index);
    for (int k = 0; k < 4; ++k) {
      const __m512i lo = _mm512_permutex2var_epi8(_mm512_load_si512(s.planes[k]), index, _mm512_load_si512(s.planes[k] + 64));
      const __m512i hi = _mm512_permutex2var_epi8(_mm512_load_si512(s.planes[k] + 128), index,
                                                  _mm512_load_si512(s.planes[k] + 192));
      b[k] = _mm512_mask_blend_epi8(upper, lo, hi);
    }
  }
  unpack4(b, out);
}

// The codes of 64 normalized values q[0..3] (16 each, in order) as 64 bytes in element order:
// code_arith.h arith_quantize_value(), lane for lane. BOUNDED: every |q| <= 1 (no clamp).
template <bool SIGNED, bool BOUNDED>
__attribute__((always_inline)) inline __m512i search64(const __m512 q[4]) {
  const ArithSearch& s = g_tables.arith[SIGNED ? 0 : 1];
  const __m512i one = _mm512_set1_epi32(1);
  __m512i searched[4], g[4];
  __mmask16 negative[4], live[4];
  for (int k = 0; k < 4; ++k) {
    searched[k] = prepare16<SIGNED, BOUNDED>(q[k], negative[k], live[k]);
    g[k] = guess16(s, searched[k]);
  }
  __m512i t[4], codes[4];
  fetch_thresholds<SIGNED>(s, pack4(g), t);
  for (int k = 0; k < 4; ++k) {
    const __mmask16 below = _mm512_cmp_ps_mask(_mm512_castsi512_ps(t[k]), _mm512_castsi512_ps(searched[k]), _CMP_LT_OQ);
    codes[k] = finish16<SIGNED>(_mm512_mask_add_epi32(g[k], below, g[k], one), negative[k], live[k]);
  }
  return pack_codes64(codes);
}

// The codes of 64 normalized values through the lattice (code_lattice.h, the vector twin of
// lattice_quantize_value()): no threshold fetch; a group with any unsure lane (rare) takes
// search64() instead. Needs g_tables.lattice[...].ready.
template <bool SIGNED, bool BOUNDED>
__attribute__((always_inline)) inline __m512i search64_lattice(const __m512 q[4]) {
  const ArithSearch& s = g_tables.arith[SIGNED ? 0 : 1];
  const LatticeSearch& l = g_tables.lattice[SIGNED ? 0 : 1];
  __m512i codes[4];
  __mmask16 unsure = 0;
  for (int k = 0; k < 4; ++k) codes[k] = codes16<SIGNED, BOUNDED>(s, l, q[k], unsure);
  if (__builtin_expect(unsure != 0, 0)) return search64<SIGNED, BOUNDED>(q);
  return pack_codes64(codes);
}

// Codes of x[0..n) through search64() (LATTICE false) or search64_lattice() (test hooks:
// po_quantize_normalized, po_check_code_search).
template <bool SIGNED, bool BOUNDED, bool LATTICE = false>
__attribute__((noinline)) void quantize(const float* x, int64_t n, uint8_t* codes) {
  for (int64_t i = 0; i < n; i += 64) {
    __m512 q[4];
    load64(x, i, n, q);
    store64(codes, i, n, LATTICE ? search64_lattice<SIGNED, BOUNDED>(q) : search64<SIGNED, BOUNDED>(q));
  }
}

}  // namespace vbmi
PO_ISA_END

#pragma GCC pop_options
#pragma GCC diagnostic pop
#endif
