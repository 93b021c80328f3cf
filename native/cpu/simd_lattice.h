// The lattice code search (code_lattice.h) on 16 lanes with AVX-512 F/BW/DQ only - no VBMI -
// and the pieces it shares with the VBMI searches of simd_vbmi.h (which include this file
// before their own target pragma, so everything here runs on every CPU of the avx512 level).
//
// Two users:
//   * simd_vbmi.h's search64_lattice(): the lattice, and for the rare group of 64 with an
//     unsure lane the exact arithmetic search with its VBMI threshold fetch;
//   * search64_lattice_table() below, for AVX-512 CPUs without VBMI (Intel Skylake-SP and
//     Cascade Lake): the same lattice, and for unsure groups the bucket table search
//     (simd_avx512.h code_bits(): one gather per 16 values). So those CPUs, too, quantize
//     without a gather in the inner loop.
// Both give the exact codes of quantize_value() (the lattice is proven at load, the fallbacks
// are exact; po_check_code_search() checks each against the reference for every float).
#pragma once

#include "simd_avx512.h"

#ifdef PO_HAVE_AVX512
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

#include "code_arith.h"
#include "code_lattice.h"
#include "tables.h"

PO_ISA_BEGIN
namespace lattice512 {

// The segment (code_lattice.h table_segment()) of 16 non-negative float bit patterns.
__attribute__((always_inline)) inline __m512i segment16(const int32_t* segment_low, const float* boundaries, __m512i bits) {
  const __m512i octave = _mm512_max_epi32(_mm512_srli_epi32(bits, 23), _mm512_set1_epi32(kArithLowExponent));
  const __m512i low = _mm512_permutex2var_epi32(_mm512_load_si512(segment_low), octave, _mm512_load_si512(segment_low + 16));
  const __m512 boundary = _mm512_permutex2var_ps(_mm512_load_ps(boundaries), octave, _mm512_load_ps(boundaries + 16));
  return _mm512_mask_add_epi32(low, _mm512_cmp_ps_mask(_mm512_castsi512_ps(bits), boundary, _CMP_GE_OQ), low,
                               _mm512_set1_epi32(1));
}

// 16 normalized values -> the bits to search (|x|, one ulp up for negative x), which lanes
// are negative (signed maps) and which are live (not the zero code).
template <bool SIGNED, bool BOUNDED>
__attribute__((always_inline)) inline __m512i prepare16(__m512 v, __mmask16& negative, __mmask16& live) {
  if (!BOUNDED) v = _mm512_max_ps(_mm512_min_ps(v, _mm512_set1_ps(1.0f)), _mm512_set1_ps(-1.0f));  // NaN -> 1
  const __m512i bits = _mm512_castps_si512(v);
  if (SIGNED) {
    const __m512i magnitude = _mm512_and_si512(bits, _mm512_set1_epi32(0x7fffffff));
    negative = _mm512_movepi32_mask(bits);
    live = _mm512_test_epi32_mask(magnitude, magnitude);
    return _mm512_mask_add_epi32(magnitude, negative, magnitude, _mm512_set1_epi32(1));  // "<=" as "<" one ulp up
  }
  negative = 0;
  live = _mm512_cmpgt_epi32_mask(bits, _mm512_setzero_si512());
  return bits;
}

// count (positive thresholds below the searched bits) -> the code of each lane (fix_code():
// a live value never takes the zero code; sign mirrored on signed maps), as int32 lanes.
template <bool SIGNED>
__attribute__((always_inline)) inline __m512i finish16(__m512i count, __mmask16 negative, __mmask16 live) {
  const __m512i one = _mm512_set1_epi32(1);
  count = _mm512_maskz_max_epi32(live, count, one);
  if (!SIGNED) return count;
  const __m512i zero_code = _mm512_set1_epi32(kSignedZeroCode);
  return _mm512_mask_sub_epi32(_mm512_add_epi32(zero_code, count), negative, zero_code, count);
}

// Four int32 vectors -> one byte vector (unsigned saturation). Byte 16L + 4m + r holds element
// 4L + r of input m (packs work per 128-bit lane); simd_vbmi.h unpack4() inverts exactly this.
__attribute__((always_inline)) inline __m512i pack4(const __m512i v[4]) {
  return _mm512_packus_epi16(_mm512_packus_epi32(v[0], v[1]), _mm512_packus_epi32(v[2], v[3]));
}

// Four vectors of int32 codes (16 each, in order) -> 64 bytes in element order.
__attribute__((always_inline)) inline __m512i pack_codes64(const __m512i codes[4]) {
  // pack4() order -> element order (the packs interleave the four vectors per 128-bit lane)
  return _mm512_permutexvar_epi32(_mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15), pack4(codes));
}

// The lattice codes of 16 normalized values (int32 lanes), valid where `unsure` (or-ed in
// here) has no bit: code_lattice.h lattice_quantize_value() without its fallback.
template <bool SIGNED, bool BOUNDED>
__attribute__((always_inline)) inline __m512i codes16(const ArithSearch& s, const LatticeSearch& l, __m512 q,
                                                      __mmask16& unsure) {
  __mmask16 negative, live;
  const __m512i searched = prepare16<SIGNED, BOUNDED>(q, negative, live);
  const __m512 x = _mm512_castsi512_ps(searched);
  const __m512i segment = segment16(l.segment_low, l.boundary, searched);
  const __m512 v = _mm512_fmadd_ps(x, _mm512_permutexvar_ps(segment, _mm512_load_ps(s.scale)),
                                   _mm512_permutexvar_ps(segment, _mm512_load_ps(l.voffset)));
  // V - nearest integer (vreduceps: exact here, see lattice_ambiguous())
  const __m512 off = _mm512_reduce_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  unsure |= _mm512_cmp_ps_mask(_mm512_abs_ps(off), _mm512_set1_ps(l.band), _CMP_LT_OQ);
  const __mmask16 below = _mm512_cmp_ps_mask(x, _mm512_permutexvar_ps(segment, _mm512_load_ps(l.inter)), _CMP_LE_OQ);
  const __m512i floor_v = _mm512_cvttps_epi32(v);
  return finish16<SIGNED>(_mm512_mask_sub_epi32(floor_v, below, floor_v, _mm512_set1_epi32(1)), negative, live);
}

// The codes of 64 normalized values q[0..3] (16 each, in order) as 64 bytes in element order,
// for AVX-512 CPUs without VBMI: the lattice, and for a group with any unsure lane (rare) the
// bucket table search (simd_avx512.h code_bits()). Needs g_tables.lattice[...].ready.
template <bool SIGNED, bool BOUNDED>
__attribute__((always_inline)) inline __m512i search64_lattice_table(const __m512 q[4]) {
  const ArithSearch& s = g_tables.arith[SIGNED ? 0 : 1];
  const LatticeSearch& l = g_tables.lattice[SIGNED ? 0 : 1];
  __m512i codes[4];
  __mmask16 unsure = 0;
  for (int k = 0; k < 4; ++k) codes[k] = codes16<SIGNED, BOUNDED>(s, l, q[k], unsure);
  if (__builtin_expect(unsure != 0, 0)) {
    return avx512::pack_codes(avx512::code_bits<SIGNED, BOUNDED>(q[0]), avx512::code_bits<SIGNED, BOUNDED>(q[1]),
                              avx512::code_bits<SIGNED, BOUNDED>(q[2]), avx512::code_bits<SIGNED, BOUNDED>(q[3]));
  }
  return pack_codes64(codes);
}

// The 64 values of x[i..) that exist (i < n; zeros past n) as four vectors, for the test
// hooks' loops below and in simd_vbmi.h.
__attribute__((always_inline)) inline void load64(const float* x, int64_t i, int64_t n, __m512 q[4]) {
  for (int k = 0; k < 4; ++k) {
    const int64_t left = n - i - 16 * k;
    const __mmask16 lanes = left >= 16 ? static_cast<__mmask16>(0xffff)
                                       : (left <= 0 ? static_cast<__mmask16>(0) : static_cast<__mmask16>((1u << left) - 1u));
    q[k] = _mm512_maskz_loadu_ps(lanes, x + i + 16 * k);
  }
}

// Stores the codes of positions i.. that exist (below n) from 64 packed bytes.
__attribute__((always_inline)) inline void store64(uint8_t* codes, int64_t i, int64_t n, __m512i packed) {
  const int64_t left = n - i;
  const __mmask64 store = left >= 64 ? ~static_cast<__mmask64>(0) : ((static_cast<__mmask64>(1) << left) - 1);
  _mm512_mask_storeu_epi8(codes + i, store, packed);
}

// Codes of x[0..n) through search64_lattice_table() (test hooks: po_quantize_normalized,
// po_check_code_search).
template <bool SIGNED, bool BOUNDED>
__attribute__((noinline)) void quantize_lattice_table(const float* x, int64_t n, uint8_t* codes) {
  for (int64_t i = 0; i < n; i += 64) {
    __m512 q[4];
    load64(x, i, n, q);
    store64(codes, i, n, search64_lattice_table<SIGNED, BOUNDED>(q));
  }
}

}  // namespace lattice512
PO_ISA_END

#pragma GCC diagnostic pop
#endif
