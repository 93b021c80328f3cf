// Shared definitions for the CPU (C++17) and CUDA (NVRTC) kernels: host/device qualifiers,
// fixed-width types, the algorithm ids and the per-step scalar struct.
//
// This directory is the single place where per-element math lives. The Python reference
// (pagedopt/functional/reference.py) performs the same float32 operations in the same order;
// keep the two in lockstep. Compile without FMA contraction (-ffp-contract=off, NVRTC
// --fmad=false) so every operation rounds like the reference and results match bit for bit.
#pragma once

#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
#define PO_HD __host__ __device__ __forceinline__
#define PO_DEVICE_CODE 1
#else
// Always inlined on the CPU too: the CPU library compiles its kernels once per instruction-set
// level (native/cpu/isa.h), and an out-of-line copy of one of these functions compiled with
// AVX-512 flags could otherwise be picked by the linker for the generic code as well.
#define PO_HD inline __attribute__((always_inline))
#endif

#if defined(__CUDACC_RTC__)
// NVRTC has no standard headers: the few fixed-width types we need.
typedef unsigned char uint8_t;
typedef unsigned short uint16_t;
typedef int int32_t;
typedef unsigned int uint32_t;
typedef long long int64_t;
typedef unsigned long long uint64_t;
#else
#include <stdint.h>
#endif

namespace pagedopt {

// Values are part of the ABI: pagedopt.functional.kinds.Algorithm.
enum Algorithm : int32_t {
  ALGO_ADAM = 0,
  ALGO_ADEMAMIX = 1,
  ALGO_MOMENTUM = 2,
  ALGO_LION = 3,
  ALGO_RMSPROP = 4,
  ALGO_ADAGRAD = 5,
};

// Parameter / gradient element types (pagedopt.backends dtype codes).
enum ElemType : int32_t { ELEM_F32 = 0, ELEM_F16 = 1, ELEM_BF16 = 2 };

constexpr int64_t kBlockSize = 256;  // elements per absmax block
constexpr int kSignedZeroCode = 127;  // index of 0.0 in the signed dynamic map

// One parameter's scalars for one step, computed on the host in float64 and rounded to
// float32 (pagedopt.functional.scalars.StepScalars; same field order).
struct StepScalars {
  float beta1, beta2, beta3;
  float one_minus_beta1, one_minus_beta2, one_minus_beta3;
  float alpha;
  float eps;
  float lr;
  float inv_bias_correction1;       // f32(1 / (1 - beta1^t)), exactly 1 without bias correction
  float inv_bias_correction2_sqrt;  // f32(1 / sqrt(1 - beta2^t)), exactly 1 without
  float weight_decay;      // L2 term added to the gradient (0 when decay is decoupled)
  float decay_factor;      // decoupled decay p *= decay_factor (exactly 1 when unused)
  float dampening_factor;  // SGD/LARS: 1 - dampening
  int32_t first_step;      // SGD/LARS: the momentum buffer starts as the gradient
  int32_t nesterov;
  int32_t skip_zeros;
};

}  // namespace pagedopt
