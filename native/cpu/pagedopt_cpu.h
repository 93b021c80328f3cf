// C ABI of the native CPU library (libpagedopt_cpu), loaded by pagedopt/backends/cpu.py with
// ctypes. Plain C types only: no torch, no exceptions across the boundary. Every entry point
// returns PO_OK or an error code; po_last_error() describes the last error of the calling
// thread. The Python side mirrors these structs field for field (keep them in sync and bump
// PO_ABI_VERSION on any change).
#pragma once
#include <stdint.h>

#include "pagedopt/common.h"

#ifdef __cplusplus
extern "C" {
#endif

#define PO_ABI_VERSION 5  // 2: StepScalars carries reciprocal bias corrections; 3: ISA levels;
                          // 4: po_update counts non-finite gradient elements;
                          // 5: po_set_code_search (mode 3: the lattice without VBMI)

// The library is built with -fvisibility=hidden: only these entry points are exported.
#define PO_API __attribute__((visibility("default")))

enum po_status {
  PO_OK = 0,
  PO_ERR_ARGUMENT = 1,   // a bad argument (message names it)
  PO_ERR_NOT_READY = 2,  // po_init() was not called or failed
  PO_ERR_INTERNAL = 3,   // unexpected exception inside the library
};

// One parameter's update (pagedopt.functional.items.UpdateItem, flattened). Tensors are
// contiguous; the Python side makes copies for strided ones.
typedef struct po_item {
  void* param;                 // numel elements of param_dtype (ELEM_F32/F16/BF16)
  const void* grad;            // numel elements of grad_dtype
  void* state1;                // float32 or uint8 codes; AdEMAMix: 2 * numel
  void* state2;                // float32 or uint8 codes, NULL for 1-state algorithms
  float* absmax1;              // 8-bit: [moments][blocks] (tensor-wise: [moments][1])
  float* absmax2;              // 8-bit: [blocks] (tensor-wise: [1])
  const float* new_absmax1;    // tensor-wise 8-bit update: [moments] maxima from prepare
  const float* new_absmax2;    // tensor-wise 8-bit update: [1]
  const float* gnorm_scale;    // scalar, NULL = 1.0
  const float* update_scale;   // scalar, NULL = 1.0
  int64_t numel;
  int32_t param_dtype;
  int32_t grad_dtype;
  int32_t quantized;           // states are uint8 codes
  int32_t block_wise;          // one absmax per 256 elements (else per tensor)
  pagedopt::StepScalars scalars;
} po_item;

// What po_prepare() returns per item.
typedef struct po_prepare_out {
  float max1[2];      // max |state1 moment| after the update (tensor-wise 8-bit items)
  float max2;         // max |state2| after the update
  int32_t reserved;
  double unorm_sq;    // squared L2 norm of the update direction (want_norms)
  double pnorm_sq;    // squared L2 norm of the parameter before the update (want_norms)
} po_prepare_out;

PO_API int po_abi_version(void);
// Build description: compiler, flags and ISA the library was compiled with.
PO_API const char* po_build_info(void);
// Space-separated /proc/cpuinfo flags the compiled code needs (empty when not recorded).
PO_API const char* po_required_cpu_flags(void);
PO_API const char* po_last_error(void);

// Instruction-set levels (0 baseline, 1 avx2, 2 avx512; native/cpu/isa.h). The library holds
// the kernels compiled for each level it was built with and runs one of them: the best level
// this CPU supports, unless po_select_isa() chose another.
PO_API int po_isa(void);                                  // the level in use
PO_API int po_isa_compiled(int32_t level);                // 1 when built into this library
PO_API const char* po_isa_missing_features(int32_t level);  // CPU features it needs that this CPU lacks
PO_API int po_select_isa(int32_t level);                  // error when not compiled or unsupported

// Install the dynamic maps (256 values) and their decision thresholds (255 values) that every
// later call uses. Idempotent; fails when the fast code tables cannot represent the maps.
PO_API int po_init(const float* qmap_signed, const float* qmap_unsigned, const float* thresholds_signed,
            const float* thresholds_unsigned);

// In-place update of every item (reference.update). When nonfinite is not NULL it receives the
// number of gradient elements that were NaN or +-Inf (their updates were skipped), counted as
// the kernels read the gradients: no second pass over them.
PO_API int po_update(int32_t algorithm, const po_item* items, int64_t count, int32_t num_threads,
                     int64_t* nonfinite);

// Maxima of the updated states and, if want_norms, the update / parameter norms, without
// writing anything (reference.prepare).
PO_API int po_prepare(int32_t algorithm, const po_item* items, int64_t count, int32_t want_norms,
               po_prepare_out* out, int32_t num_threads);

// float64 sum of squares of the finite elements of each gradient (reference.grad_norm_sq).
PO_API int po_grad_norm_sq(const void* const* grads, const int64_t* numels, const int32_t* dtypes,
                    int64_t count, double* out, int32_t num_threads);

// --- test hooks (used by tests/test_native_cpu.py) ----------------------------------------

// Compare the table search (portable, and the AVX-512 one where built) with count_below() +
// fix_code() for every float whose bit pattern lies in [first_bits, last_bits] (inclusive,
// uint32 order, one sign only). Returns the number of mismatches (-1: bad arguments);
// *first_mismatch gets the first mismatching bit pattern.
PO_API int64_t po_check_code_search(int32_t is_signed, uint32_t first_bits, uint32_t last_bits,
                             uint32_t* first_mismatch, int32_t num_threads);
// The avx512 level dequantizes with AVX-512 VBMI where the CPU has it (default), else with
// F-only permutes; 0 forces the F-only path and the code search a CPU without VBMI gets
// (a test hook; an error to enable without VBMI).
PO_API int po_set_dequantize_vbmi(int32_t enable);
// Only the avx512 level's code search (native/cpu/tables.h CodeSearch): 0 = the bucket table
// (a gather per 16 values), 1 = the gather-free arithmetic search (code_arith.h; needs VBMI),
// 2 = its lattice fast path (code_lattice.h; needs VBMI; the default on VBMI CPUs), 3 = the
// lattice with the bucket table as its fallback (simd_lattice.h; the default on other AVX-512
// CPUs). A test and benchmark hook; po_set_dequantize_vbmi() resets it to the default.
PO_API int po_set_code_search(int32_t mode);
PO_API int po_set_code_search_vbmi(int32_t mode);  // the same (its earlier name)
PO_API int po_code_search(void);  // the mode in use (-1 before po_init())
// Software prefetch distance of the 8-bit kernels in 256-element chunks (0..16, 0 = none).
// po_init() picks it per CPU vendor (tables.h); a benchmark hook, results do not depend on it.
PO_API int po_set_prefetch(int32_t chunks);
PO_API int po_get_prefetch(void);  // -1 before po_init()
// The kernels' dequantization (qmap[code] * absmax) of n codes.
PO_API int po_dequantize(int32_t is_signed, const uint8_t* codes, int64_t n, float absmax, float* out);
// Codes of normalized values through the table search (n values).
PO_API int po_quantize_normalized(int32_t is_signed, const float* x, uint8_t* codes, int64_t n);
// The header conversions, elementwise: float -> fp16/bf16 bits and back.
PO_API int po_convert_from_float(int32_t dtype, const float* x, uint16_t* out, int64_t n);
PO_API int po_convert_to_float(int32_t dtype, const uint16_t* x, float* out, int64_t n);
// How many of n float -> fp16/bf16 conversions differ from `expected` (NaN must give a NaN,
// payload free). -1 for a bad dtype.
PO_API int64_t po_count_conversion_mismatches(int32_t dtype, const float* x, const uint16_t* expected, int64_t n);

#ifdef __cplusplus
}
#endif
