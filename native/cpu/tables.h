// Process-wide constant tables: the two dynamic maps, their decision thresholds and the
// bit-indexed code search tables (code_lut.h). Filled once by po_init() from the Python
// reference's own tensors, so the maps exist in exactly one place (pagedopt/functional/qmap.py).
#pragma once
#include "code_arith.h"
#include "code_lattice.h"
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

// The avx512 level's code search (po_code_search()): the bucket table (a gather per 16
// values); on VBMI CPUs the arithmetic search (code_arith.h) or its lattice fast path
// (code_lattice.h) falling back to it; on any AVX-512 CPU the lattice falling back to the
// bucket table (simd_lattice.h). Defaults: VBMI -> kSearchLattice, else kSearchLatticeTable
// (when the maps' lattice is proven, else the best search that is).
enum CodeSearch { kSearchTable = 0, kSearchArith = 1, kSearchLattice = 2, kSearchLatticeTable = 3 };

// Whether a code search runs in the VBMI copy of the 8-bit kernel (kernel_8bit_avx512.h).
inline bool search_needs_vbmi(int32_t search) { return search == kSearchArith || search == kSearchLattice; }

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
  ArithSearch arith[2];       // [signed ? 0 : 1]: the gather-free search (code_arith.h)
  LatticeSearch lattice[2];   // [signed ? 0 : 1]: its fast path (code_lattice.h)
  int32_t dequant_vbmi;       // the avx512 level dequantizes with VBMI (the CPU has it)
  int32_t code_search;        // the avx512 level's code search (CodeSearch)
  int32_t arith_ready;        // arith[] holds a proven search for both maps
  int32_t lattice_ready;      // lattice[] too
  // How far ahead (in 256-element chunks) the 8-bit kernels prefetch, 0 = not at all: 2 measured
  // best on Intel Xeon; on AMD Zen 4 the hardware prefetchers keep up and the software ones cost
  // ~10% (AdamW8bit, 16M params, 1 thread: 28.4 ms with, 25.6 ms without).
  int32_t prefetch_chunks;
  bool ready;
};

extern Tables g_tables;

}  // namespace cpu
}  // namespace pagedopt
