// Process-wide constant tables: the two dynamic maps, their decision thresholds and the
// bit-indexed code search tables (code_lut.h). Filled once by po_init() from the Python
// reference's own tensors, so the maps exist in exactly one place (pagedopt/functional/qmap.py).
#pragma once
#include "pagedopt/code_lut.h"

namespace pagedopt {
namespace cpu {

// The code search's constants (code_lut.h), kept in memory rather than as immediates: inside
// the 8-bit kernel's loop the vector registers are all taken, and a constant in memory is
// re-read by a broadcast load (a load port) instead of being rebuilt from an immediate (a
// shuffle-port uop per use).
struct SearchConstants {
  uint32_t low_mask, zero_entry;
  float one, minus_one;
};

template <bool SIGNED>
constexpr SearchConstants search_constants() {
  return SearchConstants{CodeLut<SIGNED>::kLowMask, SIGNED ? static_cast<uint32_t>(kSignedZeroCode) << 24 : 0u, 1.0f,
                         -1.0f};
}

struct Tables {
  alignas(64) float qmap_signed[256];
  alignas(64) float qmap_unsigned[256];
  alignas(64) float thresholds_signed[256];    // 255 used
  alignas(64) float thresholds_unsigned[256];  // 255 used
  // Byte planes of the maps (plane k holds byte k of every value): AVX-512 VBMI dequantizes
  // 64 codes with byte-table permutes instead of a gather (simd_avx512.h).
  alignas(64) uint8_t qmap_planes_signed[4][256];
  alignas(64) uint8_t qmap_planes_unsigned[4][256];
  alignas(64) uint32_t lut_signed[CodeLut<true>::kEntries];
  alignas(64) uint32_t lut_unsigned[CodeLut<false>::kEntries];
  SearchConstants search[2];  // [signed ? 0 : 1]
  int32_t dequant_vbmi;       // the avx512 level dequantizes with VBMI (the CPU has it)
  bool ready;
};

extern Tables g_tables;

}  // namespace cpu
}  // namespace pagedopt
