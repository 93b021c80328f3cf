// Quantization tables in shared memory and the fast code search.
//
// The rule (native/include/pagedopt/quant.h, count_below): the code of a normalized value x
// is the number of the 255 sorted decision thresholds strictly below x. A plain binary
// search costs 8 dependent shared-memory loads per value, and on a 256-entry table every
// level of it hits one or two banks (8-way conflicts). Instead a lookup table indexed by the
// top bits of |x| (sign, exponent and PO_LUT_MANTISSA_BITS mantissa bits) gives
// lo = count_below(smallest x of that bucket); the answer lies in [lo, lo + span] where span
// is at most PO_LUT_SPAN_SIGNED / PO_LUT_SPAN_UNSIGNED (checked when the table is built,
// pagedopt/backends/cuda_tables.py), so `span` unrolled steps of
//     code += thresholds[code] < x
// reach it (thresholds are sorted, so the step stops moving once it is there; thr[255] is
// +inf as a sentinel). NaN takes count_below's answer, 255 (torch.searchsorted sorts NaN
// last). Values above 1 fall into the last bucket, whose lo is 255: normalized values may
// exceed 1 (quant.h normalize), and the search clamps them to the top code.
//
// Buckets, by the bits a of |x|: 0 = [0, 2^-PO_LUT_LOW_EXPONENT); 1..n-2 = one
// (exponent, top mantissa bits) cell each; n-1 = [1, +inf]. Negative x uses its own row.
#pragma once
#include "pagedopt/common.h"
#include "pagedopt/quant.h"
#include "tiling.cuh"

namespace pagedopt {
namespace cuda {

constexpr int kLutShift = 23 - PO_LUT_MANTISSA_BITS;
constexpr int kLutFirstKey = (127 - PO_LUT_LOW_EXPONENT) << PO_LUT_MANTISSA_BITS;
constexpr int kLutBuckets = PO_LUT_LOW_EXPONENT * (1 << PO_LUT_MANTISSA_BITS) + 2;
constexpr int kLutStride = PO_LUT_STRIDE;  // bytes per sign row (kLutBuckets rounded up to 16)
static_assert(kLutStride >= kLutBuckets && kLutStride % 16 == 0, "LUT row stride");

// One map (signed or unsigned) in shared memory. Global layout of the tables the host
// uploads once per device: maps = float[2 maps][2 = {qmap, thresholds}][256],
// luts = uint8[2 maps][2 signs][kLutStride]; map 0 is signed, map 1 unsigned.
struct QMapShared {
  float qmap[256];
  float thr[256];  // 255 thresholds + (+inf)
  uint8_t lut[2][kLutStride];
};

__device__ __forceinline__ void load_qmap(QMapShared& dst, const float* __restrict__ maps,
                                          const uint8_t* __restrict__ luts, int map) {
  const float* src = maps + map * 512;
  for (int i = threadIdx.x; i < 256; i += blockDim.x) {
    dst.qmap[i] = src[i];
    dst.thr[i] = src[256 + i];
  }
  // 2 * kLutStride bytes, copied as 32-bit words (kLutStride % 16 == 0, buffer 16-aligned)
  const uint32_t* lsrc = reinterpret_cast<const uint32_t*>(luts + map * 2 * kLutStride);
  uint32_t* ldst = reinterpret_cast<uint32_t*>(&dst.lut[0][0]);
  for (int i = threadIdx.x; i < 2 * kLutStride / 4; i += blockDim.x) ldst[i] = lsrc[i];
}

template <int SPAN>
__device__ __forceinline__ int fast_count_below(const QMapShared& m, float x) {
  if (x != x) return 255;  // NaN: count_below's answer
  const uint32_t u = __float_as_uint(x);
  const int key = (int)((u & 0x7fffffffu) >> kLutShift) - kLutFirstKey + 1;
  const int bucket = min(max(key, 0), kLutBuckets - 1);
  int code = m.lut[u >> 31][bucket];
#pragma unroll
  for (int i = 0; i < SPAN; ++i) code += (m.thr[code] < x) ? 1 : 0;
  return code;
}

// quantize_value (quant.h) with the fast search: same code for every float32 input.
template <bool SIGNED>
__device__ __forceinline__ uint8_t fast_quantize(const QMapShared& m, float x) {
  constexpr int kSpan = SIGNED ? PO_LUT_SPAN_SIGNED : PO_LUT_SPAN_UNSIGNED;
  return static_cast<uint8_t>(fix_code(fast_count_below<kSpan>(m, x), x, SIGNED));
}

}  // namespace cuda
}  // namespace pagedopt
