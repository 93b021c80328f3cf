// Types shared by the per-level kernel sources and api.cpp (data only: no functions, so
// nothing here is compiled differently per instruction-set level, see isa.h).
#pragma once
#include <stdint.h>

#include "isa.h"
#include "pagedopt_cpu.h"

namespace pagedopt {
namespace cpu {

// A unit's contribution to an item's prepare result / gradient norm.
struct UnitPartial {
  uint32_t max_bits[3];  // max magnitude bits (as uint32) of each updated state value
  double unorm_sq;
  double pnorm_sq;
  int64_t nonfinite;  // update mode: gradient elements that were NaN/Inf (their updates skipped)
};

enum Mode { MODE_UPDATE = 0, MODE_PREPARE = 1 };

typedef void (*UnitFn)(const po_item& item, int64_t begin, int64_t len, UnitPartial& out);

// fn[quantized][param dtype][grad dtype][mode]
struct KernelTable {
  UnitFn fn[2][3][3][2];
};

// Everything api.cpp calls at one instruction-set level (isa_ops.cpp fills it).
struct IsaOps {
  const char* name;                    // "avx512", "avx2", "baseline"
  const KernelTable* kernels[6];       // by Algorithm (common.h)
  // float64 fixed-lane sum of squares of the finite elements of grad[begin, begin + len)
  double (*grad_norm_sq)(int32_t dtype, const void* grad, int64_t begin, int64_t len);
  // test hooks (pagedopt_cpu.h)
  int64_t (*check_code_search)(int32_t is_signed, uint32_t first_bits, uint32_t last_bits, uint32_t* first_mismatch,
                               int32_t num_threads);
  void (*dequantize)(int32_t is_signed, const uint8_t* codes, int64_t n, float absmax, float* out);
  void (*quantize_normalized)(int32_t is_signed, const float* x, uint8_t* codes, int64_t n);
};

}  // namespace cpu
}  // namespace pagedopt
