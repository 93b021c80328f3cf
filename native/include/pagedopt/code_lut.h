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
// NaN (255, as torch.searchsorted sorts NaN last). Values outside [-1, 1] are clamped to +-1
// first and NaN is replaced by 1, which keeps every code: all thresholds lie strictly inside
// (-1, 1).
//
// K = 6 for the signed map (its densest thresholds are 0.014 apart near 1.0, a bucket there
// is 2^-7 wide) and K = 7 for the unsigned map (0.007 apart, buckets 2^-8 wide).
//
// Table index: bits >> kShift, every bucket of [0, 1] (of the magnitude for the unsigned map).
// In the signed table a negative float's sign bit lands at bit (31 - kShift) of bits >> kShift,
// so its half starts at kNegativeOffset = 2^(31 - kShift); the entries in between are never
// read. Only buckets from 2^-23 up hold thresholds (the smallest is 1.6e-7), so the entries
// normally touched are 5.9 KiB per sign (signed) and 11.8 KiB (unsigned); the buckets of
// tinier magnitudes repeat one entry and are read only for such values.
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
  static constexpr uint32_t kLast = 0x3f800000u >> kShift;  // bucket of 1.0
  // The unsigned map has no negative thresholds: every x <= 0 counts 0, no table half needed.
  static constexpr uint32_t kNegativeOffset = SIGNED ? (1u << (31 - kShift)) : 0u;
  static constexpr uint32_t kEntries = (SIGNED ? kNegativeOffset : 0u) + kLast + 1u;
  static constexpr uint32_t kNoThreshold = 0u;  // low 24 bits of an entry without a threshold
};

// x clamped to [-1, 1], NaN to 1: the same code for every x (NaN's code is 255, like 1.0's).
// (The AVX-512 search clamps with vminps/vmaxps, which give the same for NaN.)
PO_HD float clamp_unit(float x) { return !(x < 1.0f) ? 1.0f : (x > -1.0f ? x : -1.0f); }

// Table index of the bits of a value in [-1, 1]: bits >> kShift (signed map: with the sign,
// which lands at kNegativeOffset; unsigned map: of the magnitude).
template <bool SIGNED>
PO_HD uint32_t lut_index(uint32_t bits) {
  return (SIGNED ? bits : (bits & 0x7fffffffu)) >> CodeLut<SIGNED>::kShift;
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
// Returns 0, or the 1-based index of an entry whose bucket holds more than one threshold (the
// map is not the dynamic map this layout was sized for) - the caller must then not use the
// table.
template <bool SIGNED>
PO_HD int build_code_lut(const float* thresholds, uint32_t* table) {
  typedef CodeLut<SIGNED> L;
  for (uint32_t i = 0; i < L::kEntries; ++i) table[i] = 0u;  // the unused gap of the signed table
  for (uint32_t half = 0; half < (SIGNED ? 2u : 1u); ++half) {
    const bool negative = half == 1u;
    for (uint32_t b = 0; b <= L::kLast; ++b) {
      // Smallest and largest magnitude of bucket b (values are in [-1, 1]: 1.0 alone in the last).
      const uint32_t first = b << L::kShift;
      const uint32_t last = b == L::kLast ? first : (first | L::kLowMask);
      const float lo_value = negative ? -bits_float(last) : bits_float(first);
      const float hi_value = negative ? -bits_float(first) : bits_float(last);
      const int lo = count_below(thresholds, lo_value);
      const int hi = count_below(thresholds, hi_value);
      const uint32_t index = (negative ? L::kNegativeOffset : 0u) + b;
      if (hi - lo > 1) return static_cast<int>(index + 1);
      // (x == +-0 is not a nonzero x; the searches give it the zero code themselves)
      const uint32_t below = fixed_code(lo, negative, SIGNED);
      uint32_t low24 = L::kNoThreshold;  // no threshold: x_low + 0 never carries
      if (hi - lo == 1 && fixed_code(lo + 1, negative, SIGNED) != below) {
        const uint32_t threshold_low = float_bits(thresholds[lo]) & L::kLowMask;
        const uint32_t t_low = negative ? (~threshold_low & L::kLowMask) : threshold_low;
        low24 = 0xffffffu - t_low;
      }
      table[index] = (below << 24) | low24;
    }
  }
  return 0;
}

}  // namespace pagedopt
