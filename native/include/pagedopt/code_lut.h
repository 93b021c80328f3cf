// Bit-indexed nearest-code search: the same code as quantize_value() (quant.h: count_below()
// over the decision thresholds, then fix_code()) with one table load and a few integer
// operations instead of an 8-step binary search.
//
// Why it is exact. A float's magnitude bits order like its value. Cut the magnitudes into
// buckets by their exponent and top K mantissa bits (all floats in a bucket share those
// bits). The builder checks that every bucket holds at most one decision threshold, so for x
// in a bucket
//     count_below(x) = lo + [the bucket's threshold lies below x]
// where lo counts the thresholds below the whole bucket. Inside a bucket "t < x" compares
// the low (23 - K) magnitude bits (reversed for negative x, handled by storing and comparing
// the complemented bits). fix_code() clamps monotonically (signed map: x > 0 -> code >= 128,
// x < 0 -> code <= 126; unsigned: x > 0 -> code >= 1), so it is applied to both possible codes
// of a bucket when the table is built; a bucket whose two codes fix to the same one drops its
// threshold. What the table cannot know: x == +-0 (count_below(0) unfixed: 127 signed, 0
// unsigned), x <= 0 in the unsigned map (always 0: no negative thresholds; no table half), and
// NaN (255, as torch.searchsorted sorts NaN last). Magnitudes below 2^-23 (no threshold is
// that small) share the first bucket. Values outside [-1, 1] are clamped to +-1 first and NaN
// is replaced by 1, which keeps every code: all thresholds lie strictly inside (-1, 1).
//
// K = 6 for the signed map (its densest thresholds are 0.014 apart near 1.0, a bucket there
// is 2^-7 wide) and K = 7 for the unsigned map (0.007 apart, buckets 2^-8 wide).
//
// Table index: (bits >> kShift) - kFirst, the bucket of a magnitude counted from the bucket of
// 2^-23, clamped at 0. In the signed table a negative float's sign bit lands at bit
// (31 - kShift) of bits >> kShift, so its half starts at kNegativeOffset = 2^(31 - kShift);
// the entries in between are never read (only the two halves are touched, 11.8 KiB each).
//
// Table entry: bits 24..31 = the (fixed) code at or below the threshold, bits 0..23 =
// 2^24 - 1 - the threshold's low magnitude bits (complemented on the negative side; 0 = no
// threshold). Then (x_low + entry) >> 24 is the code: the sum carries into the code byte
// exactly when the threshold's low bits are below x's low bits, so the search is one add.
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
  // The unsigned map has no negative thresholds: every x <= 0 counts 0, no table half needed.
  static constexpr uint32_t kNegativeOffset = SIGNED ? (1u << (31 - kShift)) : 0u;
  static constexpr uint32_t kEntries = SIGNED ? kNegativeOffset + kBuckets : kBuckets;
  static constexpr uint32_t kNoThreshold = 0u;  // low 24 bits of an entry without a threshold
};

// x clamped to [-1, 1], NaN to 1: the same code for every x (NaN's code is 255, like 1.0's).
// (The AVX-512 search clamps with vminps/vmaxps, which give the same for NaN.)
PO_HD float clamp_unit(float x) { return !(x < 1.0f) ? 1.0f : (x > -1.0f ? x : -1.0f); }

// Table index of the bits of a value in [-1, 1]: the magnitude's bucket counted from
// kFirst (clamped at 0), plus kNegativeOffset for a negative value in the signed table.
// (Signed 32-bit arithmetic throughout: GCC emits hardware gathers only for offsets it sees
// as sign-extended int32.)
template <bool SIGNED>
PO_HD int32_t lut_index(uint32_t bits) {
  typedef CodeLut<SIGNED> L;
  const int32_t word = static_cast<int32_t>((SIGNED ? bits : (bits & 0x7fffffffu)) >> L::kShift);
  const int32_t floor = (word & static_cast<int32_t>(L::kNegativeOffset)) | static_cast<int32_t>(L::kFirst);
  return (word > floor ? word : floor) - static_cast<int32_t>(L::kFirst);
}

// quantize_value(thresholds, x, SIGNED) through the table built by build_code_lut(), in
// integer arithmetic without branches so compilers vectorize it (a gather for the entry).
// Equality with quantize_value() is checked for every float by the test suite.
template <bool SIGNED>
PO_HD uint32_t lut_quantize_value(const uint32_t* table, float x) {
  typedef CodeLut<SIGNED> L;
  const uint32_t bits = float_bits(clamp_unit(x));
  const uint32_t magnitude = bits & 0x7fffffffu;
  const uint32_t negative_mask = static_cast<uint32_t>(static_cast<int32_t>(bits) >> 31);
  const uint32_t entry = table[lut_index<SIGNED>(bits)];
  const uint32_t x_low = (bits ^ negative_mask) & L::kLowMask;  // complemented if x < 0
  const uint32_t code = (x_low + entry) >> 24;
  if (SIGNED) return magnitude == 0u ? static_cast<uint32_t>(kSignedZeroCode) : code;
  return static_cast<int32_t>(bits) > 0 ? code : 0u;  // x <= 0 (and -0): code 0
}

// The code quantize_value() gives a nonzero x of the given sign whose raw count is `count`.
PO_HD uint32_t fixed_code(int count, bool negative, bool is_signed) {
  if (!is_signed) return negative ? 0u : static_cast<uint32_t>(count < 1 ? 1 : count);
  if (negative) return static_cast<uint32_t>(count > kSignedZeroCode - 1 ? kSignedZeroCode - 1 : count);
  return static_cast<uint32_t>(count < kSignedZeroCode + 1 ? kSignedZeroCode + 1 : count);
}

// Fill `table` (CodeLut<SIGNED>::kEntries entries) from the 255 sorted decision thresholds.
// Returns 0, or the 1-based bucket that holds more than one threshold (the map is not the
// dynamic map this layout was sized for) - the caller must then not use the table.
template <bool SIGNED>
PO_HD int build_code_lut(const float* thresholds, uint32_t* table) {
  typedef CodeLut<SIGNED> L;
  for (uint32_t i = 0; i < L::kEntries; ++i) table[i] = 0u;  // the unused gap of the signed table
  for (uint32_t half = 0; half < (SIGNED ? 2u : 1u); ++half) {
    const bool negative = half == 1u;
    for (uint32_t b = 0; b < L::kBuckets; ++b) {
      // Smallest and largest magnitude that lut_index() sends to bucket b (values are in [-1, 1]).
      const uint32_t first = b == 0 ? 0u : (L::kFirst + b) << L::kShift;
      const uint32_t last = b + 1 == L::kBuckets ? 0x3f800000u : (((L::kFirst + b) << L::kShift) | L::kLowMask);
      const float lo_value = negative ? -bits_float(last) : bits_float(first);
      const float hi_value = negative ? -bits_float(first) : bits_float(last);
      const int lo = count_below(thresholds, lo_value);
      const int hi = count_below(thresholds, hi_value);
      const int bad = static_cast<int>(half * L::kBuckets + b + 1);
      if (hi - lo > 1) return bad;
      const uint32_t below = fixed_code(lo, negative, SIGNED);
      uint32_t low24 = L::kNoThreshold;  // no threshold: x_low + 0 never carries
      if (hi - lo == 1 && fixed_code(lo + 1, negative, SIGNED) != below) {
        // The clamped first bucket and the last one (1.0 alone) must not hold a threshold.
        if (b == 0 || b + 1 == L::kBuckets) return bad;
        const uint32_t threshold_low = float_bits(thresholds[lo]) & L::kLowMask;
        const uint32_t t_low = negative ? (~threshold_low & L::kLowMask) : threshold_low;
        low24 = 0xffffffu - t_low;
      }
      table[(negative ? L::kNegativeOffset : 0u) + b] = (below << 24) | low24;
    }
  }
  return 0;
}

}  // namespace pagedopt
