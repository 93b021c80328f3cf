// Stand-alone quantization kernels: the fast code search on arbitrary inputs, and an
// exhaustive self-check of it against quant.h's binary search (count_below) over every
// float32 bit pattern. The GPU tests use them; the optimizer kernels share the search.
#include "pagedopt/common.h"
#include "pagedopt/quant.h"
#include "qsearch.cuh"
#include "tiling.cuh"

namespace pagedopt {
namespace cuda {

// codes[i] = quantize_value(x[i]) with the fast search (map 0 signed, 1 unsigned).
template <bool SIGNED>
__global__ void __launch_bounds__(kThreads) quantize_codes(const float* __restrict__ x, int64_t n,
                                                           uint8_t* __restrict__ codes,
                                                           const float* __restrict__ maps,
                                                           const uint8_t* __restrict__ luts) {
  __shared__ QMapShared qs;
  load_qmap(qs, maps, luts, SIGNED ? 0 : 1);
  __syncthreads();
  for (int64_t i = (int64_t)blockIdx.x * kThreads + threadIdx.x; i < n; i += (int64_t)gridDim.x * kThreads)
    codes[i] = fast_quantize<SIGNED>(qs, x[i]);
}

// For the 32-bit patterns [start, start + count): counts inputs whose fast code differs from
// quant.h's quantize_value (binary search over the same thresholds) and records the
// smallest such pattern. result[0] = mismatches, result[1] = first mismatching pattern
// (initialise it to 0xffffffff).
template <bool SIGNED>
__global__ void __launch_bounds__(kThreads) check_code_search(uint64_t start, int64_t count,
                                                              const float* __restrict__ maps,
                                                              const uint8_t* __restrict__ luts,
                                                              unsigned long long* __restrict__ result) {
  __shared__ QMapShared qs;
  load_qmap(qs, maps, luts, SIGNED ? 0 : 1);
  __syncthreads();
  unsigned long long mismatches = 0, first_bad = 0xffffffffull;
  for (int64_t i = (int64_t)blockIdx.x * kThreads + threadIdx.x; i < count; i += (int64_t)gridDim.x * kThreads) {
    const uint32_t bits = (uint32_t)(start + (uint64_t)i);
    const float x = __uint_as_float(bits);
    if (fast_quantize<SIGNED>(qs, x) != quantize_value(qs.thr, x, SIGNED)) {
      ++mismatches;
      first_bad = min(first_bad, (unsigned long long)bits);
    }
  }
  if (mismatches) {
    atomicAdd(&result[0], mismatches);
    atomicMin(&result[1], first_bad);
  }
}

}  // namespace cuda
}  // namespace pagedopt
