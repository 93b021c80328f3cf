// The fused CPU kernels: one pass over a contiguous range ("unit") of one parameter.
// Compiled once per instruction-set level (isa.h); everything here lives in that level's
// namespace.
//
// All per-element math comes from native/include/pagedopt (shared with the CUDA kernels);
// this file only arranges the loops:
//   * 8-bit state, per 256-element chunk (= one absmax block). The avx512 level runs
//     kernel_8bit_avx512.h: the update.h math instantiated on 16-lane vectors (simd_vec.h),
//     block maxima taken in the same loop, and the requantization of the previous chunk
//     interleaved with the update of this one (the update waits on the divider, the code
//     search on the vector ALUs). The other levels run the portable loops below (avx2 with
//     explicit gathers, simd_avx2.h): dequantize each
//     state into a small local buffer; pass 1 updates the buffers and writes the parameter;
//     the block's new max |value| is taken as integer bit patterns (exact, order
//     independent); pass 2 requantizes the buffers with the new absmax. Either way a chunk
//     stays in L1 between its steps, so memory is streamed once.
//   * 32-bit state: one auto-vectorized loop, states read and written in place.
//   * prepare mode writes nothing; it returns maxima and float64 partial norms. The norms
//     use kLanes fixed accumulators indexed by position, so the sum order depends only on
//     the unit layout, never on the thread count (and both 8-bit paths add in the same order).
// Skipped elements (non-finite gradient, or zero with skip_zeros) keep their parameter bits
// and their state value (8-bit: the dequantized old value, requantized like the reference).
#pragma once
#include <stdint.h>
#include <string.h>

#include "pagedopt/code_lut.h"
#include "pagedopt/common.h"
#include "pagedopt/convert.h"
#include "pagedopt/quant.h"
#include "pagedopt/update.h"
#include "kernel_table.h"
#include "pagedopt_cpu.h"
#include "simd_avx2.h"
#include "simd_avx512.h"
#include "tables.h"

PO_ISA_BEGIN

constexpr int kLanes = 8;  // float64 accumulators per partial norm

// 512-bit vectors for the update loop where available (GCC prefers 256 by default; measured
// faster here). noinline: GCC drops the target attribute of a function it inlines.
#ifdef PO_HAVE_AVX512
#define PO_WIDE_VECTORS __attribute__((target("prefer-vector-width=512"), noinline))
#else
#define PO_WIDE_VECTORS
#endif

// Number of absmax entries per state value.
inline int64_t absmax_count(const po_item& it) {
  return it.block_wise ? (it.numel + kBlockSize - 1) / kBlockSize : 1;
}

// Value j of an element: state1 (moment j for AdEMAMix's two first moments) or state2.
template <int ALGO, class T>
inline T* value_storage(const po_item& it, int j) {
  if (ALGO == ALGO_ADEMAMIX) return j < 2 ? static_cast<T*>(it.state1) + j * it.numel : static_cast<T*>(it.state2);
  return j == 0 ? static_cast<T*>(it.state1) : static_cast<T*>(it.state2);
}

template <int ALGO>
inline float* value_absmax(const po_item& it, int j) {
  if (ALGO == ALGO_ADEMAMIX) return j < 2 ? it.absmax1 + j * absmax_count(it) : it.absmax2;
  return j == 0 ? it.absmax1 : it.absmax2;
}

// Tensor-wise 8-bit: the new absmax of value j (maxima from the prepare pass).
template <int ALGO>
inline float given_absmax(const po_item& it, int j) {
  if (ALGO == ALGO_ADEMAMIX) return j < 2 ? it.new_absmax1[j] : it.new_absmax2[0];
  return j == 0 ? it.new_absmax1[0] : it.new_absmax2[0];
}

inline uint32_t magnitude_bits(float x) { return float_bits(x) & 0x7fffffffu; }

// keep ? updated : raw, as a bitwise select of the stored bits. (Written as `p[i] = keep ?
// x : p[i]`, GCC turns the loop's store into a masked store - AVX vmaskmovps - which AMD CPUs
// run microcoded, many times slower than a plain store; the avx2 level lost 2x to it on Zen 4.)
inline float keep_or_raw(bool keep, float updated, float raw) {
  const uint32_t mask = 0u - static_cast<uint32_t>(keep);
  return bits_float((float_bits(updated) & mask) | (float_bits(raw) & ~mask));
}
inline uint16_t keep_or_raw(bool keep, uint16_t updated, uint16_t raw) {
  const uint16_t mask = static_cast<uint16_t>(0u - static_cast<uint32_t>(keep));
  return static_cast<uint16_t>((updated & mask) | (raw & static_cast<uint16_t>(~mask)));
}
inline uint32_t max_u32(uint32_t a, uint32_t b) { return a > b ? a : b; }

// Everything one element's update produces (kept = the element was not skipped). T is float,
// or a SIMD vector of floats (simd_vec.h) with its lane mask for bool.
template <class T>
struct ElementOut {
  T v0, v1, v2;  // new state values (old ones where skipped)
  T p;           // new parameter (before rounding to the parameter dtype)
  T d;           // update direction (0 where skipped)
  decltype(po_isfinite(T())) keep;
};

inline float zero_like(float) { return 0.0f; }

template <int ALGO, class T>
inline ElementOut<T> element_step(T g, T p, T v0, T v1, T v2, float gnorm_scale, float update_scale,
                                  const StepScalars& s) {
  ElementOut<T> o;
  T gk = g;
  o.keep = prepare_gradient(gk, p, gnorm_scale, s);
  T n0 = v0, n1 = v1, n2 = v2;
  const T d = AlgoUpdate<ALGO>::apply(gk, n0, n1, n2, s);
  o.v0 = po_select(o.keep, n0, v0);
  o.v1 = po_select(o.keep, n1, v1);
  o.v2 = po_select(o.keep, n2, v2);
  o.d = po_select(o.keep, d, zero_like(d));
  o.p = apply_direction(p, d, update_scale, s);
  return o;
}

// Fixed-lane float64 sums of squares of buf[0..kBlockSize) (zero padded past the data).
inline void accumulate_squares(const float* __restrict__ buf, double* __restrict__ lanes) {
  for (int64_t i0 = 0; i0 < kBlockSize; i0 += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      const double x = static_cast<double>(buf[i0 + l]);
      lanes[l] += x * x;
    }
  }
}

inline double sum_lanes(const double* lanes) {
  double total = 0.0;
  for (int l = 0; l < kLanes; ++l) total += lanes[l];
  return total;
}

// ---- 8-bit state, portable loops (the avx2 and baseline levels) ----------------------------

// Requantize n fresh values with scale `absmax` into codes (quantization.py rules: the code
// of x * (1 / absmax) - or of x / absmax outside the reciprocal range, or of 0 when absmax is
// not > 0).
template <bool SIGNED>
__attribute__((noinline)) void requantize(const float* __restrict__ fresh, int64_t n, float absmax,
                                          uint8_t* __restrict__ codes) {
  // Codes go to a local buffer first and the table is named as the global array: GCC does
  // not vectorize table gathers next to stores it cannot prove disjoint (a uint8_t pointer
  // may alias anything, even a restrict-qualified one). noinline keeps `fresh` restrict.
  const uint32_t* table = SIGNED ? g_tables.lut_signed : g_tables.lut_unsigned;
  alignas(64) uint32_t local[kBlockSize];
  if (uses_reciprocal(absmax)) {
    const float inv_absmax = absmax_reciprocal(absmax);
#ifdef PO_HAVE_AVX2
    avx2::quantize_scaled<SIGNED>(fresh, n, inv_absmax, codes);
    return;
#endif
    for (int64_t i = 0; i < n; ++i) local[i] = lut_quantize_value<SIGNED>(table, fresh[i] * inv_absmax);
  } else {
    // Subnormal, huge, zero or NaN absmax (rare): normalize() divides or gives 0.
    for (int64_t i = 0; i < n; ++i) local[i] = lut_quantize_value<SIGNED>(table, normalize(fresh[i], absmax, 0.0f));
  }
  for (int64_t i = 0; i < n; ++i) codes[i] = static_cast<uint8_t>(local[i]);
}

template <int ALGO, int J>
inline void requantize_value(const po_item& it, const float* fresh, int64_t n, float absmax, int64_t c) {
  requantize<AlgoTraits<ALGO>::value_signed(J)>(fresh, n, absmax, value_storage<ALGO, uint8_t>(it, J) + c);
}

// dequantize_value() (quant.h) with the map named as a global array: GCC emits hardware
// gathers for a global array indexed by bytes, but not for a pointer indexed by bytes.
template <bool SIGNED>
inline float dequantize_code(uint8_t code, float absmax) {
  return (SIGNED ? g_tables.qmap_signed[code] : g_tables.qmap_unsigned[code]) * absmax;
}

// Dequantize one chunk of codes into out (dequantize_value, quant.h).
template <bool SIGNED>
inline void dequantize_chunk(const uint8_t* __restrict__ codes, int64_t n, float absmax, float* __restrict__ out) {
#if defined(PO_HAVE_AVX512)
  avx512::dequantize<SIGNED>(codes, n, absmax, out);
#elif defined(PO_HAVE_AVX2)
  avx2::dequantize<SIGNED>(codes, n, absmax, out);
#else
  for (int64_t i = 0; i < n; ++i) out[i] = dequantize_code<SIGNED>(codes[i], absmax);
#endif
}

// Pass 1 of one chunk: states arrive dequantized in f0..f2 and leave updated there; update
// mode writes the parameter, prepare mode the direction and the old parameter. (restrict-qualified parameters: GCC trusts those, so it vectorizes
// without runtime alias checks.)
template <int ALGO, int PE, int GE, int MODE>
PO_WIDE_VECTORS void chunk_8bit_pass1(typename Elem<PE>::storage* __restrict__ pp,
                                      const typename Elem<GE>::storage* __restrict__ gp, float* __restrict__ f0,
                                      float* __restrict__ f1, float* __restrict__ f2, float* __restrict__ dir,
                                      float* __restrict__ pold, int64_t n, float gnorm_scale, float update_scale, const StepScalars& s) {
  constexpr int NV = AlgoTraits<ALGO>::num_values;
  typedef typename Elem<PE>::storage PS;
  for (int64_t i = 0; i < n; ++i) {
    const PS p_raw = pp[i];
    const float p = Elem<PE>::load(p_raw);
    const float g = Elem<GE>::load(gp[i]);
    const auto o = element_step<ALGO>(g, p, f0[i], NV > 1 ? f1[i] : 0.0f, NV > 2 ? f2[i] : 0.0f, gnorm_scale,
                                            update_scale, s);
    f0[i] = o.v0;
    if (NV > 1) f1[i] = o.v1;
    if (NV > 2) f2[i] = o.v2;
    if (MODE == MODE_UPDATE) {
      pp[i] = keep_or_raw(o.keep, Elem<PE>::store(o.p), p_raw);
    } else {
      dir[i] = o.d;
      pold[i] = p;
    }
  }
}

// Gradient elements of gp[0..n) that are NaN or +-Inf (update mode counts them for the
// non-finite watch while the chunk is in L1; a separate loop, because a reduction inside the
// update loop defeats GCC's vectorizer).
template <int GE>
inline int64_t count_nonfinite(const typename Elem<GE>::storage* __restrict__ gp, int64_t n) {
  int64_t bad = 0;
  for (int64_t i = 0; i < n; ++i) bad += po_isfinite(Elem<GE>::load(gp[i])) ? 0 : 1;
  return bad;
}

// The block scale of a chunk (quant.h scale_weight(): max of x >= 0, and of -x weighted by
// kNegativeWeight on the signed map) as float bits (separate loop: inside the update loop
// the reductions defeat GCC's vectorizer). Rounding is monotone, so
// max(round(-x * w)) == round(max(-x) * w): one multiply per chunk, and the result (a
// non-negative float) still reduces across chunks and threads as unsigned bits.
template <bool SIGNED>
inline uint32_t max_scale_bits(const float* __restrict__ x, int64_t n) {
  uint32_t pos = 0, neg = 0;
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t bits = float_bits(x[i]);
    const uint32_t mag = bits & 0x7fffffffu;
    const uint32_t negative = 0u - (bits >> 31);  // all ones for a set sign bit
    pos = max_u32(pos, mag & ~negative);
    neg = max_u32(neg, mag & negative);
  }
  if (!SIGNED) return max_u32(pos, neg);  // max |x| (the state is non-negative anyway)
  return max_u32(pos, float_bits(bits_float(neg) * kNegativeWeight));
}

// max_scale_bits() of each state value of a chunk (value j uses map S<j>).
template <bool S0, bool S1, bool S2, int NV>
inline void chunk_scales(float (*fresh)[kBlockSize], int64_t n, uint32_t* maxima) {
  maxima[0] = max_scale_bits<S0>(fresh[0], n);
  if (NV > 1) maxima[1] = max_scale_bits<S1>(fresh[1], n);
  if (NV > 2) maxima[2] = max_scale_bits<S2>(fresh[2], n);
}

// Software prefetch of [p, p + bytes) into the cache (the kernels are compute-heavy per byte,
// so the hardware prefetchers fall behind on the interleaved streams of a chunk).
inline void prefetch_range(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(c + off, 0, 3);
}


template <int ALGO, int PE, int GE, int MODE>
void unit_8bit_portable(const po_item& it, int64_t begin, int64_t len, UnitPartial& out) {
  constexpr int NV = AlgoTraits<ALGO>::num_values;
  constexpr bool S0 = AlgoTraits<ALGO>::value_signed(0);
  constexpr bool S1 = AlgoTraits<ALGO>::value_signed(NV > 1 ? 1 : 0);
  constexpr bool S2 = AlgoTraits<ALGO>::value_signed(NV > 2 ? 2 : 0);
  typedef typename Elem<PE>::storage PS;
  typedef typename Elem<GE>::storage GS;
  const StepScalars s = it.scalars;
  const float gnorm_scale = it.gnorm_scale ? *it.gnorm_scale : 1.0f;
  const float update_scale = it.update_scale ? *it.update_scale : 1.0f;

  alignas(64) float fresh[3][kBlockSize];
  alignas(64) float dir[kBlockSize];
  alignas(64) float pold[kBlockSize];
  double ulanes[kLanes] = {0}, planes[kLanes] = {0};
  uint32_t unit_max[3] = {0, 0, 0};
  int64_t nonfinite = 0;  // update mode: NaN/Inf gradient elements

  const int64_t end = begin + len;
  for (int64_t c = begin; c < end; c += kBlockSize) {
    const int64_t n = end - c < kBlockSize ? end - c : kBlockSize;
    const int64_t block = it.block_wise ? c / kBlockSize : 0;
    PS* pp = static_cast<PS*>(it.param) + c;
    const GS* gp = static_cast<const GS*>(it.grad) + c;
    const int64_t ahead = c + g_tables.prefetch_chunks * kBlockSize;
    if (g_tables.prefetch_chunks && ahead < end) {
      const int64_t bytes = (end - ahead < kBlockSize ? end - ahead : kBlockSize);
      prefetch_range(static_cast<PS*>(it.param) + ahead, bytes * static_cast<int64_t>(sizeof(PS)));
      prefetch_range(static_cast<const GS*>(it.grad) + ahead, bytes * static_cast<int64_t>(sizeof(GS)));
      for (int j = 0; j < NV; ++j) prefetch_range(value_storage<ALGO, uint8_t>(it, j) + ahead, bytes);
    }
    auto dequantize_all = [&]() {
      dequantize_chunk<S0>(value_storage<ALGO, uint8_t>(it, 0) + c, n, value_absmax<ALGO>(it, 0)[block], fresh[0]);
      if (NV > 1) dequantize_chunk<S1>(value_storage<ALGO, uint8_t>(it, 1) + c, n, value_absmax<ALGO>(it, 1)[block], fresh[1]);
      if (NV > 2) dequantize_chunk<S2>(value_storage<ALGO, uint8_t>(it, 2) + c, n, value_absmax<ALGO>(it, 2)[block], fresh[2]);
    };

    // Pass 1: update, write the parameter, keep the new states.
    dequantize_all();
    chunk_8bit_pass1<ALGO, PE, GE, MODE>(pp, gp, fresh[0], fresh[1], fresh[2], dir, pold, n, gnorm_scale,
                                         update_scale, s);
    if (MODE == MODE_UPDATE) nonfinite += count_nonfinite<GE>(gp, n);
    uint32_t maxima[3] = {0, 0, 0};
    chunk_scales<S0, S1, S2, NV>(fresh, n, maxima);

    if (MODE == MODE_PREPARE) {
      for (int64_t i = n; i < kBlockSize; ++i) dir[i] = pold[i] = 0.0f;
      accumulate_squares(dir, ulanes);
      accumulate_squares(pold, planes);
      for (int j = 0; j < 3; ++j) unit_max[j] = max_u32(unit_max[j], maxima[j]);
      continue;
    }

    // Pass 2: new absmax (block-wise: this block's max; tensor-wise: from prepare), requantize.
    for (int j = 0; j < NV; ++j) {
      const float absmax = it.block_wise ? bits_float(maxima[j]) : given_absmax<ALGO>(it, j);
      if (j == 0) requantize_value<ALGO, 0>(it, fresh[0], n, absmax, c);
      if (j == 1) requantize_value<ALGO, (NV > 1 ? 1 : 0)>(it, fresh[1], n, absmax, c);
      if (j == 2) requantize_value<ALGO, (NV > 2 ? 2 : 0)>(it, fresh[2], n, absmax, c);
      if (it.block_wise) value_absmax<ALGO>(it, j)[block] = absmax;
    }
  }
  if (MODE == MODE_UPDATE) out.nonfinite = nonfinite;
  if (MODE == MODE_PREPARE) {
    for (int j = 0; j < 3; ++j) out.max_bits[j] = unit_max[j];
    out.unorm_sq = sum_lanes(ulanes);
    out.pnorm_sq = sum_lanes(planes);
  }
}

PO_ISA_END

#include "kernel_8bit_avx512.h"  // the AVX-512 8-bit kernel, built on the helpers above

PO_ISA_BEGIN

// ---- 32-bit state --------------------------------------------------------------------------

template <int ALGO, int PE, int GE>
inline void range_32bit_update(typename Elem<PE>::storage* __restrict__ pp,
                               const typename Elem<GE>::storage* __restrict__ gp, float* __restrict__ s0,
                               float* __restrict__ s1, float* __restrict__ s2, int64_t n, float gnorm_scale,
                               float update_scale, const StepScalars& s) {
  constexpr int NV = AlgoTraits<ALGO>::num_values;
  typedef typename Elem<PE>::storage PS;
  for (int64_t i = 0; i < n; ++i) {
    const PS p_raw = pp[i];
    const auto o = element_step<ALGO>(Elem<GE>::load(gp[i]), Elem<PE>::load(p_raw), s0[i],
                                            NV > 1 ? s1[i] : 0.0f, NV > 2 ? s2[i] : 0.0f, gnorm_scale,
                                            update_scale, s);
    s0[i] = o.v0;
    if (NV > 1) s1[i] = o.v1;
    if (NV > 2) s2[i] = o.v2;
    pp[i] = keep_or_raw(o.keep, Elem<PE>::store(o.p), p_raw);
  }
}

template <int ALGO, int PE, int GE>
inline void chunk_32bit_prepare(const typename Elem<PE>::storage* __restrict__ pp,
                                const typename Elem<GE>::storage* __restrict__ gp, const float* __restrict__ s0,
                                const float* __restrict__ s1, const float* __restrict__ s2, int64_t n,
                                float gnorm_scale, float update_scale, const StepScalars& s,
                                float* __restrict__ dir, float* __restrict__ pold) {
  constexpr int NV = AlgoTraits<ALGO>::num_values;
  for (int64_t i = 0; i < n; ++i) {
    const float p = Elem<PE>::load(pp[i]);
    const auto o = element_step<ALGO>(Elem<GE>::load(gp[i]), p, s0[i], NV > 1 ? s1[i] : 0.0f,
                                            NV > 2 ? s2[i] : 0.0f, gnorm_scale, update_scale, s);
    dir[i] = o.d;
    pold[i] = p;
  }
}

template <int ALGO, int PE, int GE, int MODE>
void unit_32bit(const po_item& it, int64_t begin, int64_t len, UnitPartial& out) {
  constexpr int NV = AlgoTraits<ALGO>::num_values;
  typedef typename Elem<PE>::storage PS;
  typedef typename Elem<GE>::storage GS;
  const StepScalars s = it.scalars;
  const float gnorm_scale = it.gnorm_scale ? *it.gnorm_scale : 1.0f;
  const float update_scale = it.update_scale ? *it.update_scale : 1.0f;
  PS* pp = static_cast<PS*>(it.param) + begin;
  const GS* gp = static_cast<const GS*>(it.grad) + begin;
  float* s0 = value_storage<ALGO, float>(it, 0) + begin;
  float* s1 = NV > 1 ? value_storage<ALGO, float>(it, 1) + begin : s0;
  float* s2 = NV > 2 ? value_storage<ALGO, float>(it, 2) + begin : s0;

  if (MODE == MODE_UPDATE) {
    range_32bit_update<ALGO, PE, GE>(pp, gp, s0, s1, s2, len, gnorm_scale, update_scale, s);
    out.nonfinite = count_nonfinite<GE>(gp, len);
    return;
  }
  // Prepare (trust ratio norms; 32-bit state needs no maxima).
  alignas(64) float dir[kBlockSize];
  alignas(64) float pold[kBlockSize];
  double ulanes[kLanes] = {0}, planes[kLanes] = {0};
  for (int64_t c = 0; c < len; c += kBlockSize) {
    const int64_t n = len - c < kBlockSize ? len - c : kBlockSize;
    chunk_32bit_prepare<ALGO, PE, GE>(pp + c, gp + c, s0 + c, s1 + c, s2 + c, n, gnorm_scale, update_scale, s, dir,
                                      pold);
    for (int64_t i = n; i < kBlockSize; ++i) dir[i] = pold[i] = 0.0f;
    accumulate_squares(dir, ulanes);
    accumulate_squares(pold, planes);
  }
  out.unorm_sq = sum_lanes(ulanes);
  out.pnorm_sq = sum_lanes(planes);
}

template <int ALGO, int Q, int PE, int GE, int MODE>
void unit_kernel(const po_item& it, int64_t begin, int64_t len, UnitPartial& out) {
  if (Q) {
#ifdef PO_HAVE_AVX512
    if (MODE == MODE_UPDATE && search_needs_vbmi(g_tables.code_search)) {  // (prepare searches no codes)
      avx512_vbmi::unit_8bit<ALGO, PE, GE, MODE>(it, begin, len, out);
    } else {
      avx512::unit_8bit<ALGO, PE, GE, MODE>(it, begin, len, out);
    }
#else
    unit_8bit_portable<ALGO, PE, GE, MODE>(it, begin, len, out);
#endif
  } else {
    unit_32bit<ALGO, PE, GE, MODE>(it, begin, len, out);
  }
}

template <int ALGO, int Q, int PE>
void fill_param_dtype(KernelTable& t) {
  t.fn[Q][PE][ELEM_F32][MODE_UPDATE] = &unit_kernel<ALGO, Q, PE, ELEM_F32, MODE_UPDATE>;
  t.fn[Q][PE][ELEM_F32][MODE_PREPARE] = &unit_kernel<ALGO, Q, PE, ELEM_F32, MODE_PREPARE>;
  t.fn[Q][PE][ELEM_F16][MODE_UPDATE] = &unit_kernel<ALGO, Q, PE, ELEM_F16, MODE_UPDATE>;
  t.fn[Q][PE][ELEM_F16][MODE_PREPARE] = &unit_kernel<ALGO, Q, PE, ELEM_F16, MODE_PREPARE>;
  t.fn[Q][PE][ELEM_BF16][MODE_UPDATE] = &unit_kernel<ALGO, Q, PE, ELEM_BF16, MODE_UPDATE>;
  t.fn[Q][PE][ELEM_BF16][MODE_PREPARE] = &unit_kernel<ALGO, Q, PE, ELEM_BF16, MODE_PREPARE>;
}

template <int ALGO>
KernelTable make_kernel_table() {
  KernelTable t;
  memset(&t, 0, sizeof(t));
  fill_param_dtype<ALGO, 0, ELEM_F32>(t);
  fill_param_dtype<ALGO, 0, ELEM_F16>(t);
  fill_param_dtype<ALGO, 0, ELEM_BF16>(t);
  fill_param_dtype<ALGO, 1, ELEM_F32>(t);
  fill_param_dtype<ALGO, 1, ELEM_F16>(t);
  fill_param_dtype<ALGO, 1, ELEM_BF16>(t);
  return t;
}

// One translation unit per algorithm (kernels_<algo>.cpp) defines these, so the build
// compiles them in parallel.
const KernelTable& kernels_adam();
const KernelTable& kernels_ademamix();
const KernelTable& kernels_momentum();
const KernelTable& kernels_lion();
const KernelTable& kernels_rmsprop();
const KernelTable& kernels_adagrad();

// This level's entry point (isa_ops.cpp).
const IsaOps& isa_ops();

PO_ISA_END
