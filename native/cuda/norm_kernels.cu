// Gradient norms on the device, many tensors per launch, so percentile clipping never waits
// for the host (pagedopt.functional.reference.grad_norm_sq):
//
//   grad_norm_partials<P>  float64 sum of g^2 over the finite elements of each chunk
//   finalize_sums          per-tensor sum of its chunk partials, in a fixed order
//
// Partials per chunk (instead of atomics) keep the result deterministic run to run.
#include "pagedopt/common.h"
#include "pagedopt/convert.h"
#include "pagedopt/update.h"
#include "tiling.cuh"

namespace pagedopt {
namespace cuda {

template <int P>
__global__ void __launch_bounds__(kThreads) grad_norm_partials(const NormDesc* __restrict__ descs,
                                                               const int64_t* __restrict__ chunk_prefix,
                                                               int num_tensors, double* __restrict__ partials) {
  typedef typename Elem<P>::storage T;
  constexpr int VEC = 16 / (int)sizeof(T);
  constexpr int GROUPS = kElemsPerLane / VEC;
  __shared__ double scratch[kWarps];
  const int64_t total = chunk_prefix[num_tensors];
  const int lane = lane_id(), warp = warp_id();
  int t = 0;
  for (int64_t chunk = blockIdx.x; chunk < total; chunk += gridDim.x) {  // uniform over the CTA
    t = find_tensor(chunk_prefix, num_tensors, chunk, t);
    const NormDesc& d = descs[t];
    const bool vec_ok = (d.flags & kFlagVectorOk) != 0;
    const T* data = static_cast<const T*>(d.data);
    double acc = 0.0;
    const int64_t chunk_base = (chunk - chunk_prefix[t]) * kReduceChunkElems;
    for (int sub = 0; sub < kReduceSubchunks; ++sub) {
      const int64_t base = chunk_base + (int64_t)sub * kChunkElems + (int64_t)warp * kWarpElems;
      if (base >= d.numel) break;  // warp-uniform; later sub-chunks are further out
#pragma unroll
      for (int j = 0; j < GROUPS; ++j) {
        const int64_t first = base + (int64_t)j * 32 * VEC + (int64_t)lane * VEC;
        const int64_t valid = d.numel - first;
        T raw[VEC];
        load_group<T, VEC>(data + first, raw, vec_ok && valid >= VEC, valid);
#pragma unroll
        for (int i = 0; i < VEC; ++i) {
          const float g = Elem<P>::load(raw[i]);  // padding loads as 0
          if (po_isfinite(g)) acc += (double)g * (double)g;
        }
      }
    }
    const double sum = block_reduce<SumReduce>(acc, scratch);
    if (threadIdx.x == 0) partials[chunk] = sum;
  }
}

// One CTA per tensor: out[t] = sum of partials[chunk_prefix[t] .. chunk_prefix[t + 1]).
__global__ void __launch_bounds__(kThreads) finalize_sums(const int64_t* __restrict__ chunk_prefix, int num_tensors,
                                                          const double* __restrict__ partials,
                                                          double* __restrict__ out) {
  __shared__ double scratch[kWarps];
  const int t = blockIdx.x;
  if (t >= num_tensors) return;  // uniform over the CTA
  double acc = 0.0;
  for (int64_t c = chunk_prefix[t] + threadIdx.x; c < chunk_prefix[t + 1]; c += kThreads) acc += partials[c];
  const double sum = block_reduce<SumReduce>(acc, scratch);
  if (threadIdx.x == 0) out[t] = sum;
}

}  // namespace cuda
}  // namespace pagedopt
