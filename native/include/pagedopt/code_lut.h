// Bit-indexed nearest-code search: the same code as count_below() (quant.h) with one table
// load and one integer comparison instead of an 8-step binary search.
//
// Why it is exact. A float's magnitude bits order like its value. Cut the magnitudes into
// buckets by their exponent and top K mantissa bits (all floats in a bucket share those
// bits). The builder checks that every bucket holds at most one decision threshold, so for x
// in a bucket
//     count_below(x) = lo + [the bucket's threshold lies below x]
// where lo counts the thresholds below the whole bucket. Inside a bucket "t < x" is an
// integer comparison of the low (23 - K) magnitude bits (reversed for negative x). A bucket
// without a threshold stores a sentinel that never compares true. Magnitudes below 2^-23
// (no threshold is that small) share the first bucket, magnitudes above 1.0 the last; NaN
// gives 255 like torch.searchsorted (NaN sorts last).
//
// K = 6 for the signed map (its densest thresholds are 0.014 apart near 1.0, a bucket there
// is 2^-7 wide) and K = 7 for the unsigned map (0.007 apart, buckets 2^-8 wide). The tables
// are 11.8 KiB each, small enough to stay in L1 next to the data streams.
//
// Table entry: bits 24..31 = lo, bits 0..23 = the threshold's low magnitude bits (or the
// sentinel: all ones on the positive side, 0 on the negative side).
#pragma once
#include "common.h"
#include "convert.h"
#include "quant.h"

namespace pagedopt {

template <bool SIGNED>
struct CodeLut {
  static constexpr int kMantissaBits = SIGNED ? 6 : 7;
  static constexpr int kShift = 23 - kMantissaBits;
  static constexpr uint32_t kLowMask = (1u << kShift) - 1u;
  static constexpr uint32_t kFirst = (104u << 23) >> kShift;    // bucket of 2^-23
  static constexpr uint32_t kLast = 0x3f800000u >> kShift;       // bucket of 1.0
  static constexpr uint32_t kBuckets = kLast - kFirst + 1u;
  // The unsigned map has no negative thresholds: every x <= -0 counts 0, no table half needed.
  static constexpr uint32_t kEntries = SIGNED ? 2u * kBuckets : kBuckets;
};

// Bucket index of x's magnitude bits, clamped to the table's range.
template <bool SIGNED>
PO_HD uint32_t lut_bucket(uint32_t magnitude) {
  typedef CodeLut<SIGNED> L;
  uint32_t b = magnitude >> L::kShift;
  b = b < L::kFirst ? L::kFirst : b;
  b = b > L::kLast ? L::kLast : b;
  return b - L::kFirst;
}

// quantize_value(thresholds, x, SIGNED) (= fix_code(count_below(x), x)) through the table
// built by build_code_lut(). Integer arithmetic only, without branches or boolean selects, so
// compilers vectorize it (a gather for the table entry, the rest plain lane-wise ops):
//   below:    [t < x], i.e. x_low > t_low (positive x) or t_low > x_low (negative x), from
//             the sign of their difference (both are < 2^24);
//   fix_code: signed: x > 0 -> code >= 128, x < 0 -> code <= 126 (a max / a min);
//             unsigned: x <= -0 -> 0 (no negative thresholds), x > 0 -> code >= 1;
//   NaN:      255 (torch.searchsorted sorts NaN last), after the fix like the reference.
// Equality with quantize_value() is checked for every float in [-1, 1] by the test suite.
template <bool SIGNED>
PO_HD uint32_t lut_quantize_value(const uint32_t* table, float x) {
  typedef CodeLut<SIGNED> L;
  const uint32_t bits = float_bits(x);
  const uint32_t magnitude = bits & 0x7fffffffu;
  const uint32_t negative = bits >> 31;
  const uint32_t negative_mask = 0u - negative;
  const uint32_t entry = table[lut_bucket<SIGNED>(magnitude) + (SIGNED ? (negative_mask & L::kBuckets) : 0u)];
  const uint32_t t_low = entry & 0x00ffffffu;
  const uint32_t x_low = magnitude & L::kLowMask;
  const uint32_t signed_gap = ((t_low - x_low) ^ negative_mask) - negative_mask;  // < 0 iff t < x
  uint32_t code = (entry >> 24) + (signed_gap >> 31);
  const uint32_t nonzero = (0u - magnitude) >> 31;
  const uint32_t positive = nonzero & (negative ^ 1u);
  if (SIGNED) {
    const uint32_t floor = positive << 7;                               // 128 or 0
    const uint32_t ceiling = 255u - ((nonzero & negative) * 129u);      // 126 or 255
    code = code < floor ? floor : code;
    code = code > ceiling ? ceiling : code;
  } else {
    code &= negative - 1u;
    code = code < positive ? positive : code;
  }
  const uint32_t nan_mask = static_cast<uint32_t>(static_cast<int32_t>(0x7f800000u - magnitude) >> 31);
  return code | (nan_mask & 255u);
}

// Fill `table` (CodeLut<SIGNED>::kEntries entries) from the 255 sorted decision thresholds.
// Returns 0, or the 1-based bucket that holds more than one threshold (the map is not the
// dynamic map this layout was sized for) - the caller must then not use the table.
template <bool SIGNED>
PO_HD int build_code_lut(const float* thresholds, uint32_t* table) {
  typedef CodeLut<SIGNED> L;
  for (uint32_t half = 0; half < (SIGNED ? 2u : 1u); ++half) {
    for (uint32_t b = 0; b < L::kBuckets; ++b) {
      // Smallest and largest magnitude that lut_bucket() sends to bucket b.
      uint32_t first = b == 0 ? 0u : (L::kFirst + b) << L::kShift;
      uint32_t last = b + 1 == L::kBuckets ? 0x7f800000u : (((L::kFirst + b) << L::kShift) | L::kLowMask);
      float lo_value = half ? -bits_float(last) : bits_float(first);
      float hi_value = half ? -bits_float(first) : bits_float(last);
      int lo = count_below(thresholds, lo_value);
      int hi = count_below(thresholds, hi_value);
      uint32_t t_low = half ? 0u : L::kLowMask;  // sentinel: never "below"
      if (hi - lo > 1) return static_cast<int>(half * L::kBuckets + b + 1);
      if (hi - lo == 1) {
        // The clamped end buckets must not hold a threshold: their low bits mean nothing.
        if (b == 0 || b + 1 == L::kBuckets) return static_cast<int>(half * L::kBuckets + b + 1);
        t_low = float_bits(thresholds[lo]) & 0x7fffffffu & L::kLowMask;
      }
      table[half * L::kBuckets + b] = (static_cast<uint32_t>(lo) << 24) | t_low;
    }
  }
  return 0;
}

}  // namespace pagedopt
