// Fused optimizer kernels: dequantize -> update -> requantize in one pass over memory, for
// every algorithm, parameter dtype (fp32/fp16/bf16, gradient of the same dtype) and state
// mode, many tensors per launch.
//
//   update_kernel<ALGO, P, MODE, NUM>    the update (writes parameters, states, block absmax)
//   prepare_kernel<ALGO, P, MODE, NUM>   the same math without writing: per-chunk partials of the
//                                   update norm^2 and parameter norm^2 (float64, trust ratio)
//                                   and the maxima of the updated states (tensor-wise 8-bit)
//   finalize_prepare                per-tensor sums/maxima of those partials, fixed order
//
// MODE: 32-bit state, 8-bit block-wise (one absmax per 256 elements = per warp, computed
// from the updated float32 values before requantizing), 8-bit tensor-wise (dequantize with
// the old absmax, requantize with the maxima of the prepare pass; the host copies them
// into absmax after the launch, because every CTA still reads the old value).
//
// NUM: numerics mode (fast_math.cuh). NUMERICS_STRICT (0, the default, so the strict kernels
// keep their names): the per-element math of native/include/pagedopt/update.h
// (= pagedopt.functional.reference), bit for bit. NUMERICS_FAST (1): fused multiply-adds,
// approximate sqrt and division, arithmetic dequantization (fast_math.cuh).
#include "pagedopt/common.h"
#include "pagedopt/convert.h"
#include "pagedopt/quant.h"
#include "pagedopt/update.h"
#include "fast_math.cuh"
#include "qsearch.cuh"
#include "tiling.cuh"

namespace pagedopt {
namespace cuda {

enum StateMode : int { MODE_STATE32 = 0, MODE_BLOCK8 = 1, MODE_TENSOR8 = 2 };

// Update kernels: at least 4 CTAs (32 warps) per SM, a register cap of 64. Measured on an
// H200 (ncu, AdamW8bit block-wise, NVRTC 13.0): with 2 CTAs per SM ptxas used 91 registers,
// 16 warps per SM issued in only 48% of the cycles (latency-bound: load, then a long
// dequantize/update/requantize chain per tile) and the kernel reached 35% of copy bandwidth.
// Prepare kernels keep at least 2 CTAs (cap 128): with a cap of 64 some of them spill.
constexpr int kMinBlocksPerSM = 2;
// AdEMAMix (three state values per element) needs more registers: it keeps 2 CTAs.
template <int ALGO>
__host__ __device__ constexpr int update_min_blocks_per_sm() {
  return AlgoTraits<ALGO>::num_values > 2 ? kMinBlocksPerSM : 3;
}

// Which state tensor (0: state1, 1: state2) and which moment inside it holds value v of the
// per-element update: Adam (m, v); AdEMAMix (m1, m2 in state1, v in state2); others (s).
template <int ALGO>
__host__ __device__ constexpr int value_tensor(int v) {
  return ALGO == ALGO_ADAM ? v : (ALGO == ALGO_ADEMAMIX ? (v == 2 ? 1 : 0) : 0);
}
template <int ALGO>
__host__ __device__ constexpr int value_moment(int v) {
  return (ALGO == ALGO_ADEMAMIX && v == 1) ? 1 : 0;
}

struct PrepareAcc {
  double unorm_sq;
  double pnorm_sq;
  float max[3];
};

// How block_reduce (tiling.cuh) combines two PrepareAcc: sums and NaN-propagating maxima.
struct PrepareReduce {
  static __device__ __forceinline__ PrepareAcc identity() { return PrepareAcc{0.0, 0.0, {0.0f, 0.0f, 0.0f}}; }
  static __device__ __forceinline__ PrepareAcc warp(PrepareAcc a) {
    a.unorm_sq = warp_sum(a.unorm_sq);
    a.pnorm_sq = warp_sum(a.pnorm_sq);
#pragma unroll
    for (int v = 0; v < 3; ++v) a.max[v] = warp_max(a.max[v]);
    return a;
  }
};

// The absmax entry value v was quantized with (tensor-wise: entry per moment).
template <int ALGO, int MODE>
__device__ __forceinline__ float* absmax_of(const TensorDesc& d, int v, int64_t block) {
  if (value_tensor<ALGO>(v) == 1) return d.absmax2 + block;
  const int64_t stride = (MODE == MODE_BLOCK8) ? (d.numel + kBlockSize - 1) / kBlockSize : 1;
  return d.absmax1 + value_moment<ALGO>(v) * stride + block;
}

// Write one warp tile back: parameters (skipped elements keep their exact stored bits),
// then each state value (8-bit: requantized against the block absmax of the updated values,
// or the tensor-wise maxima of the prepare pass).
template <int ALGO, int P, int MODE>
__device__ __forceinline__ void store_tile(const TensorDesc& d, int64_t base, const QMapShared* qs,
                                           const typename Elem<P>::storage* praw, const bool* keep,
                                           const float* p_new, float (*val)[kElemsPerLane],
                                           const int64_t* first, const int64_t* valid, const bool* vec) {
  typedef typename Elem<P>::storage T;
  constexpr int VEC = 16 / (int)sizeof(T);
  constexpr int GROUPS = kElemsPerLane / VEC;
  constexpr int NV = AlgoTraits<ALGO>::num_values;
  const int lane = lane_id();
  const int64_t n = d.numel;
  const int64_t block = base / kBlockSize;
  // parameters: skipped elements keep their exact stored bits
  // (float32: p_new already holds the stored value where the update was skipped, so the raw
  // copy need not stay live - 8 registers fewer, what lets the update kernels fit 3 CTAs)
  T pout[kElemsPerLane];
#pragma unroll
  for (int i = 0; i < kElemsPerLane; ++i) {
    if constexpr (P == ELEM_F32) {
      pout[i] = p_new[i];
    } else {
      pout[i] = keep[i] ? Elem<P>::store(p_new[i]) : praw[i];
    }
  }
#pragma unroll
  for (int j = 0; j < GROUPS; ++j) store_group<T, VEC>(static_cast<T*>(d.param) + first[j], pout + j * VEC, vec[j], valid[j]);

#pragma unroll
  for (int v = 0; v < NV; ++v) {
    void* base_ptr = value_tensor<ALGO>(v) == 0 ? d.state1 : d.state2;
    const int64_t moment_offset = value_moment<ALGO>(v) * n;
    if constexpr (MODE == MODE_STATE32) {
      float* dst = static_cast<float*>(base_ptr) + moment_offset;
#pragma unroll
      for (int j = 0; j < GROUPS; ++j) store_group<float, VEC>(dst + first[j], val[v] + j * VEC, vec[j], valid[j]);
    } else {
      const bool is_signed = AlgoTraits<ALGO>::value_signed(v);
      float absmax;
      if constexpr (MODE == MODE_BLOCK8) {
        float local = 0.0f;
        // the block scale rule of quant.h: negative values weigh 1/0.99297 on signed maps
#pragma unroll
        for (int i = 0; i < kElemsPerLane; ++i) local = nan_max(local, scale_weight(val[v][i], is_signed));
        absmax = warp_max(local);
        // every lane read the old absmax before the shuffles above, so this write is safe
        if (lane == 0) *absmax_of<ALGO, MODE>(d, v, block) = absmax;
      } else {
        absmax = value_tensor<ALGO>(v) == 0 ? d.new_absmax1[value_moment<ALGO>(v)] : d.new_absmax2[0];
      }
      const float inv_absmax = absmax_reciprocal(absmax);  // once per block (quant.h)
      uint8_t codes[kElemsPerLane];
#pragma unroll
      for (int i = 0; i < kElemsPerLane; ++i) {
        const float x = normalize(val[v][i], absmax, inv_absmax);
        codes[i] = is_signed ? fast_quantize<true>(qs[0], x) : fast_quantize<false>(qs[1], x);
      }
      uint8_t* dst = static_cast<uint8_t*>(base_ptr) + moment_offset;
#pragma unroll
      for (int j = 0; j < GROUPS; ++j) store_group<uint8_t, VEC>(dst + first[j], codes + j * VEC, vec[j], valid[j]);
    }
  }
}

// One warp's 256 elements starting at `base` (< numel): load, update, and either store
// (PREPARE = false) or accumulate into `acc` (PREPARE = true). All 32 lanes must call it.
template <int ALGO, int P, int MODE, bool PREPARE, int NUM>
__device__ __forceinline__ void run_tile(const TensorDesc& d, int64_t base, const QMapShared* qs,
                                         PrepareAcc& acc, bool want_norms, float pow10_lane,
                                         unsigned long long* nonfinite) {
  typedef typename Elem<P>::storage T;
  constexpr int VEC = 16 / (int)sizeof(T);  // elements per 16-byte parameter access
  constexpr int GROUPS = kElemsPerLane / VEC;
  constexpr int NV = AlgoTraits<ALGO>::num_values;
  constexpr int64_t kBlock = kBlockSize;

  const int lane = lane_id();
  const int64_t n = d.numel;
  const bool vec_ok = (d.flags & kFlagVectorOk) != 0;
  const StepScalars s = d.scalars;
  const float gnorm_scale = d.gnorm_scale ? *d.gnorm_scale : 1.0f;
  const int64_t block = base / kBlock;

  int64_t first[GROUPS], valid[GROUPS];
  bool vec[GROUPS];
#pragma unroll
  for (int j = 0; j < GROUPS; ++j) {
    first[j] = base + (int64_t)j * 32 * VEC + (int64_t)lane * VEC;
    valid[j] = n - first[j];
    vec[j] = vec_ok && valid[j] >= VEC;
  }

  T praw[kElemsPerLane], graw[kElemsPerLane];
#pragma unroll
  for (int j = 0; j < GROUPS; ++j) {
    load_group<T, VEC>(static_cast<const T*>(d.param) + first[j], praw + j * VEC, vec[j], valid[j]);
    load_group<T, VEC>(static_cast<const T*>(d.grad) + first[j], graw + j * VEC, vec[j], valid[j]);
  }
  if constexpr (!PREPARE) {
    // The non-finite watch's count (pagedopt/optim/nonfinite.py), when the host passed one:
    // counted here, before the states are loaded (few registers live), with an atomic only
    // for a tile that has any (rare).
    if (nonfinite != nullptr) {
      unsigned bad = 0;
#pragma unroll
      for (int i = 0; i < kElemsPerLane; ++i)
        bad += ((int64_t)(i % VEC) < valid[i / VEC] && !po_isfinite(Elem<P>::load(graw[i]))) ? 1u : 0u;
      if (bad != 0) atomicAdd(nonfinite, (unsigned long long)bad);
    }
  }

  float val[3][kElemsPerLane];  // NV of them used
#pragma unroll
  for (int v = 0; v < NV; ++v) {
    void* base_ptr = value_tensor<ALGO>(v) == 0 ? d.state1 : d.state2;
    const int64_t moment_offset = value_moment<ALGO>(v) * n;
    if constexpr (MODE == MODE_STATE32) {
      const float* src = static_cast<const float*>(base_ptr) + moment_offset;
#pragma unroll
      for (int j = 0; j < GROUPS; ++j) load_group<float, VEC>(src + first[j], val[v] + j * VEC, vec[j], valid[j]);
    } else {
      const uint8_t* src = static_cast<const uint8_t*>(base_ptr) + moment_offset;
      uint8_t codes[kElemsPerLane];
#pragma unroll
      for (int j = 0; j < GROUPS; ++j) load_group<uint8_t, VEC>(src + first[j], codes + j * VEC, vec[j], valid[j]);
      const float old_absmax = *absmax_of<ALGO, MODE>(d, v, MODE == MODE_BLOCK8 ? block : 0);
      const bool is_signed = AlgoTraits<ALGO>::value_signed(v);
      if constexpr (NUM == NUMERICS_FAST) {
#pragma unroll
        for (int i = 0; i < kElemsPerLane; ++i)
          val[v][i] = __fmul_rn(fast_code_value(codes[i], is_signed, pow10_lane), old_absmax);
      } else {
        const QMapShared& m = qs[is_signed ? 0 : 1];
#pragma unroll
        for (int i = 0; i < kElemsPerLane; ++i) val[v][i] = dequantize_value(m.qmap, codes[i], old_absmax);
      }
    }
  }

  const float update_scale = (!PREPARE && d.update_scale) ? *d.update_scale : 1.0f;
  bool keep[kElemsPerLane];
  float p_new[kElemsPerLane];
#pragma unroll
  for (int i = 0; i < kElemsPerLane; ++i) {
    const bool live = (int64_t)(i % VEC) < valid[i / VEC];
    const float p = Elem<P>::load(praw[i]);
    float g = Elem<P>::load(graw[i]);
    const bool k = live && numerics_prepare_gradient<ALGO, NUM>(g, p, gnorm_scale, s);
    float dir = 0.0f;
    p_new[i] = p;
    if (k) {
      float s0 = val[0][i], s1 = NV > 1 ? val[1][i] : 0.0f, s2 = NV > 2 ? val[2][i] : 0.0f;
      dir = numerics_update<ALGO, NUM>(g, s0, s1, s2, s);
      val[0][i] = s0;
      if (NV > 1) val[1][i] = s1;
      if (NV > 2) val[2][i] = s2;
      if (!PREPARE) p_new[i] = numerics_apply_direction<NUM>(p, dir, update_scale, s);
    }
    if (!live) {
#pragma unroll
      for (int v = 0; v < NV; ++v) val[v][i] = 0.0f;  // padding: like the reference's zero pad
    }
    keep[i] = k;
    if constexpr (PREPARE) {
      if (want_norms) {
        acc.unorm_sq += (double)dir * (double)dir;  // dir is 0 unless kept
        acc.pnorm_sq += live ? (double)p * (double)p : 0.0;
      }
      if constexpr (MODE == MODE_TENSOR8) {
#pragma unroll
        for (int v = 0; v < NV; ++v)
          acc.max[v] = nan_max(acc.max[v], scale_weight(val[v][i], AlgoTraits<ALGO>::value_signed(v)));
      }
    }
  }
  if constexpr (!PREPARE) store_tile<ALGO, P, MODE>(d, base, qs, praw, keep, p_new, val, first, valid, vec);
}

// Load the maps the algorithm uses into shared memory (map 0 signed, map 1 unsigned).
template <int ALGO>
__device__ __forceinline__ void load_maps(QMapShared* qs, const float* maps, const uint8_t* luts) {
  bool need[2] = {false, false};
#pragma unroll
  for (int v = 0; v < AlgoTraits<ALGO>::num_values; ++v) need[AlgoTraits<ALGO>::value_signed(v) ? 0 : 1] = true;
  if (need[0]) load_qmap(qs[0], maps, luts, 0);
  if (need[1]) load_qmap(qs[1], maps, luts, 1);
  __syncthreads();
}

template <int ALGO, int P, int MODE, int NUM = NUMERICS_STRICT>
__global__ void __launch_bounds__(kThreads, update_min_blocks_per_sm<ALGO>()) update_kernel(const TensorDesc* __restrict__ descs,
                                                          const int64_t* __restrict__ chunk_prefix,
                                                          int num_tensors, const float* __restrict__ maps,
                                                          const uint8_t* __restrict__ luts,
                                                          unsigned long long* __restrict__ nonfinite) {
  __shared__ QMapShared qs[2];
  if constexpr (MODE != MODE_STATE32) load_maps<ALGO>(qs, maps, luts);
  const int64_t total = chunk_prefix[num_tensors];
  PrepareAcc unused;
  const float pow10_lane = NUM == NUMERICS_FAST ? pow10_of_lane() : 0.0f;
  int t = 0;
  for (int64_t chunk = blockIdx.x; chunk < total; chunk += gridDim.x) {
    t = find_tensor(chunk_prefix, num_tensors, chunk, t);
    const TensorDesc& d = descs[t];
    const int64_t base = (chunk - chunk_prefix[t]) * kChunkElems + (int64_t)warp_id() * kWarpElems;
    if (base < d.numel) run_tile<ALGO, P, MODE, false, NUM>(d, base, qs, unused, false, pow10_lane, nonfinite);
  }
}

template <int ALGO, int P, int MODE, int NUM = NUMERICS_STRICT>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSM) prepare_kernel(const TensorDesc* __restrict__ descs,
                                                           const int64_t* __restrict__ chunk_prefix,
                                                           int num_tensors, const float* __restrict__ maps,
                                                           const uint8_t* __restrict__ luts,
                                                           PreparePartial* __restrict__ partials, int want_norms) {
  __shared__ QMapShared qs[2];
  __shared__ PrepareAcc scratch[kWarps];
  if constexpr (MODE != MODE_STATE32) load_maps<ALGO>(qs, maps, luts);
  const float pow10_lane = NUM == NUMERICS_FAST ? pow10_of_lane() : 0.0f;
  const int64_t total = chunk_prefix[num_tensors];
  int t = 0;
  // The loop condition is uniform over the CTA, so the barriers inside are safe.
  for (int64_t chunk = blockIdx.x; chunk < total; chunk += gridDim.x) {
    t = find_tensor(chunk_prefix, num_tensors, chunk, t);
    const TensorDesc& d = descs[t];
    PrepareAcc acc = PrepareReduce::identity();
    const int64_t chunk_base = (chunk - chunk_prefix[t]) * kReduceChunkElems;
    for (int sub = 0; sub < kReduceSubchunks; ++sub) {
      const int64_t base = chunk_base + (int64_t)sub * kChunkElems + (int64_t)warp_id() * kWarpElems;
      if (base < d.numel) run_tile<ALGO, P, MODE, true, NUM>(d, base, qs, acc, want_norms != 0, pow10_lane, nullptr);
    }
    const PrepareAcc w = block_reduce<PrepareReduce>(acc, scratch);
    if (threadIdx.x == 0) {
      PreparePartial out;
      out.unorm_sq = w.unorm_sq;
      out.pnorm_sq = w.pnorm_sq;
      out.max[0] = w.max[0];
      out.max[1] = w.max[1];
      out.max[2] = w.max[2];
      out.padding = 0.0f;
      partials[chunk] = out;
    }
  }
}

// One CTA per tensor: sums (and maxima) of its partials in a fixed order. Writes
// norms[2t] = update norm^2, norms[2t + 1] = parameter norm^2, maxima[3t + v].
__global__ void __launch_bounds__(kThreads) finalize_prepare(const int64_t* __restrict__ chunk_prefix,
                                                             int num_tensors,
                                                             const PreparePartial* __restrict__ partials,
                                                             double* __restrict__ norms, float* __restrict__ maxima) {
  __shared__ PrepareAcc scratch[kWarps];
  const int t = blockIdx.x;
  if (t >= num_tensors) return;  // uniform over the CTA
  PrepareAcc acc = PrepareReduce::identity();
  for (int64_t c = chunk_prefix[t] + threadIdx.x; c < chunk_prefix[t + 1]; c += kThreads) {
    const PreparePartial p = partials[c];
    acc.unorm_sq += p.unorm_sq;
    acc.pnorm_sq += p.pnorm_sq;
#pragma unroll
    for (int v = 0; v < 3; ++v) acc.max[v] = nan_max(acc.max[v], p.max[v]);
  }
  const PrepareAcc w = block_reduce<PrepareReduce>(acc, scratch);
  if (threadIdx.x == 0) {
    norms[2 * (int64_t)t] = w.unorm_sq;
    norms[2 * (int64_t)t + 1] = w.pnorm_sq;
#pragma unroll
    for (int v = 0; v < 3; ++v) maxima[3 * (int64_t)t + v] = w.max[v];
  }
}

}  // namespace cuda
}  // namespace pagedopt
