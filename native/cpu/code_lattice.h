// The lattice code search: code_arith.h's arithmetic search without its threshold fetch, for
// almost every value.
//
// Why it works. code_arith.h's affine W(x) puts the decision thresholds inside a decade at
// (almost exactly) "index + 1/2", so V = W + 1/2 puts them on the integers and count (the
// number of positive thresholds below x) is floor(V) - except (a) within rounding distance of
// a lattice threshold, and (b) between the decade's start and the one threshold that lies off
// the lattice, the threshold between two decades (about 0.2 lattice steps above the start,
// where V already reads the next count), and (c) above the last threshold (between the map's
// last lattice value and 1.0, off the lattice too). (b) is one compare per segment: count =
// floor(V) - [x <= inter[segment]]. (c) is a segment of its own - everything above the last
// threshold, found by the octave lookup with that threshold as the octave's boundary - whose
// V is the constant count + 1/2. (a) is detected instead of corrected: a lane whose V lies
// within `band` of an integer is ambiguous, and a group of 64 values with any ambiguous lane
// takes code_arith.h's exact search (bands 2^-16 signed, 2^-15 unsigned on the dynamic maps:
// on Gaussian test states 0.2% of the signed and 1% of the unsigned groups fall back).
// Per 16 values that replaces the byte-plane fetch of 64 thresholds and its unpacking (about
// 4 vector shuffles per 16 values, the part of the search Zen 4 pays most for) by one 16-entry
// permute, a compare and the band test.
//
// Not trusted either: build_lattice_search() proves, over the same pieces as
// prove_arith_search() (count, segment and the inter-decade correction constant, V monotone),
// that every value gets the exact count or is flagged, for the smallest band that works, and
// disables the lattice (LatticeSearch::ready = 0) otherwise. lattice_quantize_value() is the
// scalar twin of simd_vbmi.h's search64_lattice(); the test suite checks both against
// quantize_value() for every float.
#pragma once
#include <math.h>
#include <stdint.h>

#include "code_arith.h"

namespace pagedopt {
namespace cpu {

struct LatticeSearch {
  // By octave, as ArithSearch's, plus the top segment: above the last threshold.
  alignas(64) int32_t segment_low[32];
  alignas(64) float boundary[32];
  alignas(64) float voffset[16];  // by segment: V = x * ArithSearch::scale + voffset
  alignas(64) float inter[16];    // by segment: the off-lattice threshold (-inf: none)
  float band;                     // |V - nearest integer| < band: ambiguous
  int32_t ready;                  // proven for this map (else the caller keeps code_arith.h's search)
};

inline int32_t table_segment(const int32_t* segment_low, const float* boundary, uint32_t bits);

// The segment code_arith.h's guess uses for the (non-negative) float bits.
inline int32_t arith_segment_of(const ArithSearch& s, uint32_t bits) { return table_segment(s.segment_low, s.boundary, bits); }

// The segment of the (non-negative) float bits from octave tables, as the vector code finds it.
inline int32_t table_segment(const int32_t* segment_low, const float* boundary, uint32_t bits) {
  const int32_t exponent = static_cast<int32_t>(bits >> 23);
  const int32_t octave = (exponent > static_cast<int32_t>(kArithLowExponent) ? exponent : static_cast<int32_t>(kArithLowExponent)) & 31;
  return (segment_low[octave] + (bits_float(bits) >= boundary[octave] ? 1 : 0)) & 15;
}

inline int32_t lattice_segment(const LatticeSearch& l, uint32_t bits) {
  return table_segment(l.segment_low, l.boundary, bits);
}

// V of the (non-negative) float bits, as the vector code computes it.
inline float lattice_v(const ArithSearch& s, const LatticeSearch& l, uint32_t bits) {
  const int32_t segment = lattice_segment(l, bits);
  return fmaf(bits_float(bits), s.scale[segment], l.voffset[segment]);
}

// |V - nearest integer| < band (the subtraction is exact: V and its nearest integer are
// within 1/2 of each other).
inline bool lattice_ambiguous(const LatticeSearch& l, float v) { return fabsf(v - nearbyintf(v)) < l.band; }

// The fast count (valid when not ambiguous).
inline int32_t lattice_count(const ArithSearch& s, const LatticeSearch& l, uint32_t bits) {
  return convert_truncate(lattice_v(s, l, bits)) - (bits_float(bits) <= l.inter[lattice_segment(l, bits)] ? 1 : 0);
}

// Whether the fast count of the bits may be wrong (then the exact search decides).
inline bool lattice_unsure(const ArithSearch& s, const LatticeSearch& l, uint32_t bits) {
  return lattice_ambiguous(l, lattice_v(s, l, bits));
}

// quantize_value() through the lattice search (the scalar twin of search64_lattice(); the
// vector code falls back for a whole group, the twin per value - the same codes, since the
// fallback is exact).
template <bool SIGNED>
inline uint32_t lattice_quantize_value(const ArithSearch& s, const LatticeSearch& l, float value) {
  const uint32_t bits = float_bits(clamp_unit(value));
  const uint32_t magnitude = SIGNED ? (bits & 0x7fffffffu) : bits;
  const bool negative = SIGNED && (bits >> 31) != 0;
  const uint32_t searched = magnitude + (negative ? 1u : 0u);
  if (lattice_unsure(s, l, searched)) return arith_quantize_value<SIGNED>(s, value);
  int32_t count = lattice_count(s, l, searched);
  const bool live = SIGNED ? magnitude != 0u : static_cast<int32_t>(bits) > 0;
  count = live ? (count > 1 ? count : 1) : 0;
  if (!SIGNED) return saturate_byte(count);
  return saturate_byte(negative ? kSignedZeroCode - count : kSignedZeroCode + count);
}

// A piece whose values must all read `target` (truncate(V)), V monotone from v_lo to v_hi:
// values below `target` must all be flagged, which holds when the lowest is within band of
// it, and values at or above target + 1 likewise when the highest is. (The differences are
// exact where they matter: near an integer, Sterbenz.)
inline bool lattice_piece_ok(const LatticeSearch& l, float v_lo, float v_hi, int32_t target) {
  const float t = static_cast<float>(target);
  return (v_lo >= t || t - v_lo < l.band) && (v_hi < t + 1.0f || v_hi - (t + 1.0f) < l.band);
}

// Proves the lattice for every float bit pattern in [0, last] (see prove_arith_search() for
// the pieces). Returns 0 or 1 + the first failing bit pattern.
inline int64_t prove_lattice_search(const ArithSearch& s, const LatticeSearch& l, uint32_t last) {
  uint32_t breaks[32 * 2 + 256 + 2];
  const int n = arith_breakpoints(s, last, breaks);
  for (int i = 0; i + 1 < n; ++i) {
    const uint32_t lo = breaks[i], hi = breaks[i + 1] - 1u;
    if (breaks[i + 1] <= lo || lo > last) continue;
    const int32_t count = count_positive_below(s, bits_float(lo));
    if (count != count_positive_below(s, bits_float(hi)) || lattice_segment(l, lo) != lattice_segment(l, hi)) {
      return 1 + static_cast<int64_t>(lo);
    }
    const float inter = l.inter[lattice_segment(l, lo)];
    const bool below_lo = bits_float(lo) <= inter, below_hi = bits_float(hi) <= inter;
    if (below_lo != below_hi) return 1 + static_cast<int64_t>(lo);
    const int32_t target = count + (below_lo ? 1 : 0);  // what convert_truncate(V) must read
    if (!lattice_piece_ok(l, lattice_v(s, l, lo), lattice_v(s, l, hi), target)) return 1 + static_cast<int64_t>(lo);
  }
  return 0;
}

// Fills `l` for a map whose ArithSearch `s` is built (build_arith_search() succeeded): the
// lattice offsets, the off-lattice threshold of each segment, and the smallest band (a power
// of two from 2^-20 to 2^-8) for which the proof holds. Returns 0 (ready) or 1 (no band works).
inline int64_t build_lattice_search(const ArithSearch& s, bool is_signed, LatticeSearch& l) {
  l.ready = 0;
  for (int octave = 0; octave < 32; ++octave) {
    l.segment_low[octave] = s.segment_low[octave];
    l.boundary[octave] = s.boundary[octave];
  }
  // The top segment: one past the last decade's, for x above the last threshold (its octave
  // has no power of ten, so its boundary is free) and for x >= 1 (the octave of 1.0).
  const float top = s.positive[s.count - 1];
  const int32_t top_segment = arith_segment_of(s, float_bits(top)) + 1;
  const uint32_t top_octave = (float_bits(top) >> 23) & 31, one_octave = (float_bits(1.0f) >> 23) & 31;
  if (top_segment >= 16 || s.scale[top_segment] != 0.0f || l.boundary[top_octave] != kArithNoBoundary ||
      l.segment_low[top_octave] + 1 != top_segment || l.segment_low[one_octave] + 1 != top_segment) {
    return 1;
  }
  l.boundary[top_octave] = nextafterf(top, 2.0f);  // x > top <=> x >= the next float
  l.boundary[one_octave] = 0.0f;
  for (int seg = 0; seg < 16; ++seg) {
    l.voffset[seg] = static_cast<float>(static_cast<double>(s.offset[seg]) + 0.5);
    l.inter[seg] = -INFINITY;
  }
  l.voffset[top_segment] = static_cast<float>(s.count) + 0.5f;  // (scale 0: V = count + 1/2)
  for (uint32_t e = kArithLowExponent; e <= 127; ++e) {  // each segment's bottom, from the octave table
    const float boundary = s.boundary[e & 31];
    const uint32_t bottom = boundary != kArithNoBoundary ? float_bits(boundary) : (e << 23);
    const int32_t seg = lattice_segment(l, bottom);
    if (l.inter[seg] != -INFINITY || seg == top_segment) continue;
    // V at the segment's bottom reads the count of its first cell; the threshold with index
    // (that count - 1) is the inter-decade one when it lies at or above the bottom.
    const int32_t reads = convert_truncate(lattice_v(s, l, bottom));
    if (reads >= 1 && reads - 1 < s.count && s.positive[reads - 1] >= bits_float(bottom)) {
      l.inter[seg] = s.positive[reads - 1];
    }
  }
  const uint32_t last = is_signed ? 0x3f800001u : 0x3f800000u;
  for (int k = 20; k >= 8; --k) {
    l.band = ldexpf(1.0f, -k);
    if (prove_lattice_search(s, l, last) == 0) {
      l.ready = 1;
      return 0;
    }
  }
  return 1;
}

}  // namespace cpu
}  // namespace pagedopt
