// Arithmetic code search: the nearest-code search of quant.h (count_below() + fix_code())
// without a table gather, for the avx512 level on CPUs with AVX-512 VBMI (simd_vbmi.h).
//
// Why it works. The dynamic map (pagedopt/functional/qmap.py) is linear inside each decade:
// for exponent level i the values per sign are 10^(i-6) * (0.1 + 0.9 (k + 1/2) / n_i), so the
// decision thresholds between them sit on an even lattice of step s_i = 0.9 / n_i (in units
// of 10^(i-6)), and the one threshold between two decades sits 0.2 lattice steps above the
// decade's start. Count the positive thresholds below x ("count"). Within the decade of x the
// affine function W(x) = base_i - 1/2 + (x / 10^(i-6) - 0.1) / s_i puts every threshold of
// the decade 0.3 or less from "its index + 1/2", so g = floor(W(x)) is count or count - 1,
// with at least 0.2 to spare for float32 rounding. One compare of x with threshold g then
// gives count exactly:  count = g + (t[g] < x). The decade of x comes from its binary
// exponent (one table lookup) and one compare with the power of ten inside that octave.
//
// Negative x (signed map): the map is symmetric apart from 1.0, so the negative thresholds
// are the first 127 positive ones negated; count_below(x) = 127 - #{t <= |x|}. "t <= |x|" is
// "t < next float above |x|", so the search runs on |x| + 1 ulp with the same strict compare.
//
// The guess is not trusted: build_arith_search() proves "g is count or count - 1" for every
// float in [0, 1 + 1 ulp] (every piece between the search's breakpoints, where g is monotone
// and count constant) and refuses maps for which it fails. arith_quantize_value() is the
// scalar definition the vector code follows operation for operation; the test suite checks
// both against quantize_value() for every float (po_check_code_search).
#pragma once
#include <math.h>
#include <stdint.h>

#include "pagedopt/code_lut.h"

namespace pagedopt {
namespace cpu {

constexpr int kArithDecades = 7;            // exponent levels of the dynamic map (qmap.py)
constexpr uint32_t kArithLowExponent = 96;  // biased exponents below this (x < 2^-31) share one octave entry
constexpr float kArithNoBoundary = 2.0f;    // boundary of an octave without a power of ten (never reached)

// Search constants of one map (tables.h holds one per map). Indexes: octave = (biased exponent,
// at least 96) & 31; segment 0 = below 1e-7, segment i + 1 = decade i.
struct ArithSearch {
  alignas(64) int32_t segment_low[32];  // by octave: the segment of the octave's bottom
  alignas(64) float boundary[32];       // by octave: the power of ten inside it, else kArithNoBoundary
  alignas(64) float scale[16];          // by segment: W = x * scale + offset
  alignas(64) float offset[16];
  alignas(64) uint8_t planes[4][256];   // byte k of positive threshold g (VBMI byte-table lookups)
  alignas(64) float positive[256];      // positive thresholds in increasing order, +inf after the last
  int32_t count;                        // number of positive thresholds (signed 128, unsigned 255)
};

// float -> int32 as vcvttps2dq does it: truncation, and INT32_MIN for NaN and out of range.
inline int32_t convert_truncate(float w) {
  if (!(w > -2147483648.0f && w < 2147483648.0f)) return INT32_MIN;
  return static_cast<int32_t>(w);
}

// The guess g for the (non-negative) float bits `bits`, as the vector code computes it.
inline int32_t arith_guess(const ArithSearch& s, uint32_t bits) {
  const int32_t exponent = static_cast<int32_t>(bits >> 23);
  const int32_t octave = (exponent > static_cast<int32_t>(kArithLowExponent) ? exponent : static_cast<int32_t>(kArithLowExponent)) & 31;
  const float x = bits_float(bits);
  const int32_t segment = s.segment_low[octave] + (x >= s.boundary[octave] ? 1 : 0);
  return convert_truncate(fmaf(x, s.scale[segment & 15], s.offset[segment & 15]));
}

// Saturation of packus (int32 -> uint16 -> uint8): what a lane's value becomes as a byte.
inline uint32_t saturate_byte(int32_t v) { return v < 0 ? 0u : (v > 255 ? 255u : static_cast<uint32_t>(v)); }

// quantize_value() through the arithmetic search (the scalar twin of simd_vbmi.h's search64()).
template <bool SIGNED>
inline uint32_t arith_quantize_value(const ArithSearch& s, float value) {
  const uint32_t bits = float_bits(clamp_unit(value));
  const uint32_t magnitude = SIGNED ? (bits & 0x7fffffffu) : bits;
  const bool negative = SIGNED && (bits >> 31) != 0;
  const uint32_t searched = magnitude + (negative ? 1u : 0u);  // negative: "<=" as "<" one ulp up
  const int32_t g = arith_guess(s, searched);
  int32_t count = g + (s.positive[saturate_byte(g)] < bits_float(searched) ? 1 : 0);
  const bool live = SIGNED ? magnitude != 0u : static_cast<int32_t>(bits) > 0;  // signed: x != 0; unsigned: x > 0
  count = live ? (count > 1 ? count : 1) : 0;  // fix_code(): a nonzero x never takes the zero code
  if (!SIGNED) return saturate_byte(count);
  return saturate_byte(negative ? kSignedZeroCode - count : kSignedZeroCode + count);
}

// #{t in positive[0, count) : t < x}
inline int32_t count_positive_below(const ArithSearch& s, float x) {
  int32_t lo = 0, hi = s.count;
  while (lo < hi) {
    const int32_t mid = (lo + hi) / 2;
    if (s.positive[mid] < x) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  return lo;
}

// g must be count or count - 1, and a valid lookup index: signed maps look up 128 entries
// (the byte permute ignores bit 7), unsigned ones 256 (entry 255 is +inf).
inline bool guess_ok(int32_t g, int32_t count, bool is_signed) {
  return (g == count || g == count - 1) && g >= 0 && g < (is_signed ? 128 : 256);
}

// The sorted breakpoints of [0, last] (octave starts, the octaves' powers of ten, the float
// after each threshold) into breaks[] (room for 32 * 2 + 256 + 2); returns how many. Between
// two consecutive ones the segment is fixed (so the affine functions are monotone) and the
// count of thresholds below x is constant.
inline int arith_breakpoints(const ArithSearch& s, uint32_t last, uint32_t* breaks) {
  int n = 0;
  breaks[n++] = 0u;
  for (uint32_t e = kArithLowExponent; e <= 127; ++e) {
    breaks[n++] = e << 23;
    const float b = s.boundary[e & 31];
    if (b != kArithNoBoundary) breaks[n++] = float_bits(b);
  }
  for (int32_t k = 0; k < s.count; ++k) breaks[n++] = float_bits(s.positive[k]) + 1u;
  breaks[n++] = last + 1u;
  for (int i = 1; i < n; ++i) {  // insertion sort: a few hundred entries, once per process
    for (int j = i; j > 0 && breaks[j - 1] > breaks[j]; --j) {
      const uint32_t t = breaks[j];
      breaks[j] = breaks[j - 1];
      breaks[j - 1] = t;
    }
  }
  return n;
}

// Proves the guess for every float bit pattern in [0, last]: on each piece between
// breakpoints g is monotone and count constant, so checking both ends of each piece covers it.
// Returns 0 or 1 + the first failing bit pattern.
inline int64_t prove_arith_search(const ArithSearch& s, uint32_t last, bool is_signed) {
  uint32_t breaks[32 * 2 + 256 + 2];
  const int n = arith_breakpoints(s, last, breaks);
  for (int i = 0; i + 1 < n; ++i) {
    const uint32_t lo = breaks[i], hi = breaks[i + 1] - 1u;
    if (breaks[i + 1] <= lo || lo > last) continue;  // empty piece (duplicate breakpoints)
    const int32_t count = count_positive_below(s, bits_float(lo));
    if (count != count_positive_below(s, bits_float(hi))) return 1 + static_cast<int64_t>(lo);  // (a missed threshold)
    if (!guess_ok(arith_guess(s, lo), count, is_signed)) return 1 + static_cast<int64_t>(lo);
    if (!guess_ok(arith_guess(s, hi), count, is_signed)) return 1 + static_cast<int64_t>(hi);
  }
  return 0;
}

// Fills `s` from the 255 sorted decision thresholds. Returns 0, or a nonzero code when the map
// is not the dynamic map this search is built for: 1 = the signed map is not symmetric,
// 2 = the guess fails somewhere (the caller then keeps the table search).
template <bool SIGNED>
inline int64_t build_arith_search(const float* thresholds, ArithSearch& s) {
  const int32_t first = SIGNED ? kSignedZeroCode : 0;  // signed: t[127] lies between 0 and the smallest positive value
  s.count = SIGNED ? 128 : 255;
  if (SIGNED) {
    for (int k = 0; k < kSignedZeroCode; ++k) {
      if (thresholds[kSignedZeroCode - 1 - k] != -thresholds[kSignedZeroCode + k]) return 1;
    }
  }
  for (int g = 0; g < 256; ++g) {
    s.positive[g] = g < s.count ? thresholds[first + g] : INFINITY;
    for (int k = 0; k < 4; ++k) s.planes[k][g] = static_cast<uint8_t>(float_bits(s.positive[g]) >> (8 * k));
  }
  float power[kArithDecades];  // 1e-7 ... 1e-1: where decades 0 ... 6 start
  for (int i = 0; i < kArithDecades; ++i) power[i] = static_cast<float>(pow(10.0, i - kArithDecades));
  for (int seg = 0; seg < 16; ++seg) s.scale[seg] = 0.0f, s.offset[seg] = 0.5f;  // segment 0: g = 0
  for (int i = 0; i < kArithDecades; ++i) {
    const double per_sign = SIGNED ? (1 << i) : (2 << i);  // values per sign in decade i
    const double unit = pow(10.0, i - (kArithDecades - 1));
    const double step = 0.9 / per_sign;
    const int32_t base = count_positive_below(s, static_cast<float>(unit * (0.1 + 0.5 * step)));
    s.scale[i + 1] = static_cast<float>(1.0 / (step * unit));
    s.offset[i + 1] = static_cast<float>(base - 0.5 - 0.1 / step);
  }
  for (uint32_t e = kArithLowExponent; e <= 127; ++e) {
    const float bottom = bits_float(e << 23), top = 2.0f * bottom;
    int32_t segment = 0;
    float boundary = kArithNoBoundary;
    for (int i = 0; i < kArithDecades; ++i) {
      if (power[i] <= bottom) segment = i + 1;
      if (bottom < power[i] && power[i] < top) boundary = power[i];
    }
    s.segment_low[e & 31] = segment;
    s.boundary[e & 31] = boundary;
  }
  // signed: |x| + 1 ulp reaches one float above 1.0
  return prove_arith_search(s, SIGNED ? 0x3f800001u : 0x3f800000u, SIGNED) ? 2 : 0;
}

}  // namespace cpu
}  // namespace pagedopt
