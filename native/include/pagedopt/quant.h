// Dynamic-map quantization rules (pagedopt/functional/quantization.py is the reference):
//   block scale ("absmax"): max over the block of scale_weight(x): x for the unsigned map;
//     for the signed map x >= 0 ? x : -x * kNegativeWeight, so a negative extreme lands exactly
//     on the lowest code (-0.99297) instead of losing 0.7% at every requantization
//   normalize: x * inv_absmax in float32, inv_absmax = 1.0f / absmax computed once per block
//     (an IEEE division); 0 when absmax is 0 or NaN. Only for 2^-126 <= absmax <= 2^126, where
//     the reciprocal is a normal float: other blocks (subnormal absmax, whose reciprocal may
//     overflow; huge or infinite absmax, whose reciprocal would be subnormal) divide, x / absmax.
//     In the reciprocal range |x| <= absmax gives |x * inv_absmax| <= 1 (fl(a * fl(1/a)) <= 1
//     for every such float a, checked exhaustively by the tests), but searches still clamp:
//   code: number of decision thresholds strictly below x (255 thresholds, see qmap.py), which
//     is 255 for any x above the top threshold (x > 1 too) and 0 below the lowest one
//   no collapse / no sign flip: a nonzero value never gets the zero code or a code of the
//   opposite sign (signed map: 126/128 around the zero code 127; unsigned map: code 1)
//   dequantize: qmap[code] * absmax in float32
#pragma once
#include "common.h"

namespace pagedopt {

// float32(1 / 0.99296875...): 1 / |lowest code of the signed map| (bits 0x3f80e808).
constexpr float kNegativeWeight = 1.0070810317993164f;

PO_HD float scale_weight(float x, bool is_signed) {
  if (!is_signed) return x < 0.0f ? -x : x;
  return x >= 0.0f ? x : -x * kNegativeWeight;
}

// The absmax range where blocks normalize with the reciprocal (2^-126 and 2^126).
constexpr float kReciprocalMin = 1.17549435082228750797e-38f;
constexpr float kReciprocalMax = 8.50705917302346158658e+37f;

PO_HD bool uses_reciprocal(float absmax) { return absmax >= kReciprocalMin && absmax <= kReciprocalMax; }

// A block's normalization factor: 1 / absmax where uses_reciprocal(absmax), else 0 (unused).
PO_HD float absmax_reciprocal(float absmax) { return uses_reciprocal(absmax) ? 1.0f / absmax : 0.0f; }

// x normalized by its block's scale; inv_absmax = absmax_reciprocal(absmax).
PO_HD float normalize(float x, float absmax, float inv_absmax) {
  if (uses_reciprocal(absmax)) return x * inv_absmax;
  return absmax > 0.0f ? x / absmax : 0.0f;
}

// Reference code search: binary search for #{t < x} over the 255 sorted thresholds.
// Kernels may use faster searches (code_lut.h) that must return the same code.
// NaN counts as above every threshold (255), like torch.searchsorted in the reference.
PO_HD int count_below(const float* thresholds, float x) {
  if (!(x == x)) return 255;
  int lo = 0, hi = 255;  // answer in [lo, hi]
  while (lo < hi) {
    int mid = (lo + hi) >> 1;
    if (thresholds[mid] < x) lo = mid + 1; else hi = mid;
  }
  return lo;
}

// The no-collapse / no-sign-flip rule applied to a raw nearest code.
PO_HD int fix_code(int code, float x, bool is_signed) {
  if (is_signed) {
    if (x > 0.0f && code <= kSignedZeroCode) return kSignedZeroCode + 1;
    if (x < 0.0f && code >= kSignedZeroCode) return kSignedZeroCode - 1;
    return code;
  }
  return (x > 0.0f && code == 0) ? 1 : code;
}

PO_HD uint8_t quantize_value(const float* thresholds, float x, bool is_signed) {
  return static_cast<uint8_t>(fix_code(count_below(thresholds, x), x, is_signed));
}

PO_HD float dequantize_value(const float* qmap, uint8_t code, float absmax) { return qmap[code] * absmax; }

}  // namespace pagedopt
