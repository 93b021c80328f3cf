// The 8-bit kernel of the avx512 level (included by kernels.h, which holds the portable one).
//
// Per 256-element chunk (one absmax block), in one sweep over groups of 64 elements:
//   * the update: update.h's math instantiated on 16-lane vectors (simd_vec.h), reading the
//     states dequantized at the start of the chunk and the parameter and gradient, writing
//     the parameter and the new float32 states (into a chunk buffer), and folding the new
//     states into per-lane block maxima;
//   * interleaved with it, the requantization of the *previous* chunk, whose block scale is
//     known by then. The update waits on the divider (sqrt and one division per element);
//     the code search (a table gather and ~10 integer operations per value) on the other
//     vector ports, so the two overlap instead of running back to back.
// The result is the same as the portable loops' (and the reference's), bit for bit: the
// same operations per element, maxima as integer bit patterns (order independent), and the
// prepare mode's float64 sums in the same lane order.
#pragma once

#ifdef PO_HAVE_AVX512
#include <type_traits>

#include "simd_vec.h"

PO_ISA_BEGIN
namespace avx512 {

// How one state value of one chunk is requantized (quant.h normalize()).
struct Requant {
  enum Kind { kZero, kMultiplyBounded, kMultiply, kDivide };
  Kind kind;
  float absmax;
  float inv_absmax;
};

// bounded: absmax is the scale of exactly these values (block-wise), so |x * inv| <= 1.
inline Requant requant_for(float absmax, bool bounded) {
  if (uses_reciprocal(absmax)) {
    return Requant{bounded ? Requant::kMultiplyBounded : Requant::kMultiply, absmax, absmax_reciprocal(absmax)};
  }
  return Requant{absmax > 0.0f ? Requant::kDivide : Requant::kZero, absmax, 0.0f};  // 0 or NaN: all zero
}

inline __mmask16 lanes16(int64_t n) { return n >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << n) - 1u); }
inline __mmask64 lanes64(int64_t n) { return n >= 64 ? ~static_cast<__mmask64>(0) : ((static_cast<__mmask64>(1) << n) - 1); }

// Codes of x[0..n) (n <= 64) under r into codes[0..n).
template <bool SIGNED>
inline void requantize64(const float* x, int64_t n, const Requant& r, uint8_t* codes) {
  __m512i packed;
  if (r.kind == Requant::kZero) {
    packed = _mm512_set1_epi8(static_cast<char>(SIGNED ? kSignedZeroCode : 0));
  } else {
    __m512i c[4];
    for (int k = 0; k < 4; ++k) {
      const __m512 v = n >= 64 ? _mm512_loadu_ps(x + 16 * k) : _mm512_maskz_loadu_ps(lanes16(n - 16 * k), x + 16 * k);
      switch (r.kind) {
        case Requant::kMultiplyBounded:
          c[k] = code_bits<SIGNED, true>(_mm512_mul_ps(v, _mm512_set1_ps(r.inv_absmax)));
          break;
        case Requant::kMultiply:
          c[k] = code_bits<SIGNED, false>(_mm512_mul_ps(v, _mm512_set1_ps(r.inv_absmax)));
          break;
        default:
          c[k] = code_bits<SIGNED, false>(_mm512_div_ps(v, _mm512_set1_ps(r.absmax)));
          break;
      }
    }
    packed = pack_codes(c[0], c[1], c[2], c[3]);
  }
  if (n >= 64) {
    _mm512_storeu_si512(codes, packed);
  } else {
    _mm512_mask_storeu_epi8(codes, lanes64(n), packed);
  }
}

// Running block scale of one state value (quant.h scale_weight()) as integer maxima: as int32
// the non-negative floats order by magnitude above every negative one; as uint32 the negative
// floats order by magnitude above every non-negative one.
template <bool SIGNED>
struct BlockMax {
  __m512i as_signed = _mm512_setzero_si512();
  __m512i as_unsigned = _mm512_setzero_si512();

  template <bool FULL>
  void add(VecF x, __mmask16 live) {
    const __m512i bits = _mm512_castps_si512(x.v);
    if (SIGNED) {
      as_signed = FULL ? _mm512_max_epi32(as_signed, bits) : _mm512_mask_max_epi32(as_signed, live, as_signed, bits);
      as_unsigned = FULL ? _mm512_max_epu32(as_unsigned, bits) : _mm512_mask_max_epu32(as_unsigned, live, as_unsigned, bits);
    } else {
      const __m512i magnitude = _mm512_and_si512(bits, _mm512_set1_epi32(0x7fffffff));
      as_unsigned = FULL ? _mm512_max_epu32(as_unsigned, magnitude)
                         : _mm512_mask_max_epu32(as_unsigned, live, as_unsigned, magnitude);
    }
  }

  // The block scale as float bits: max over x >= 0 and over -x * kNegativeWeight for x < 0
  // (monotone rounding: max(round(-x * w)) == round(max(-x) * w)); unsigned map: max |x|.
  uint32_t bits() const {
    const uint32_t top = static_cast<uint32_t>(_mm512_reduce_max_epu32(as_unsigned));
    if (!SIGNED) return top;
    const uint32_t pos = static_cast<uint32_t>(_mm512_reduce_max_epi32(as_signed));
    const uint32_t neg = (top >> 31) ? (top & 0x7fffffffu) : 0u;
    return max_u32(pos, float_bits(bits_float(neg) * kNegativeWeight));
  }
};

// Fixed-lane float64 sums of squares (kLanes = 8 lanes; element i of a chunk goes to lane i % 8
// in increasing i, like accumulate_squares()). x * x is exact in float64, so one fused
// multiply-add rounds exactly like the product followed by the sum.
inline __m512d add_squares(__m512d lanes, VecF x) {
  const __m512d lo = _mm512_cvtps_pd(_mm512_castps512_ps256(x.v));
  const __m512d hi = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(x.v), 1)));
  lanes = _mm512_fmadd_pd(lo, lo, lanes);
  return _mm512_fmadd_pd(hi, hi, lanes);
}

template <int ALGO, int PE, int GE, int MODE>
void unit_8bit(const po_item& it, int64_t begin, int64_t len, UnitPartial& out) {
  static_assert(kLanes == 8, "add_squares() accumulates 8 float64 lanes");
  constexpr int NV = AlgoTraits<ALGO>::num_values;
  constexpr bool S0 = AlgoTraits<ALGO>::value_signed(0);
  constexpr bool S1 = AlgoTraits<ALGO>::value_signed(NV > 1 ? 1 : 0);
  constexpr bool S2 = AlgoTraits<ALGO>::value_signed(NV > 2 ? 2 : 0);
  typedef typename Elem<PE>::storage PS;
  typedef typename Elem<GE>::storage GS;
  const StepScalars s = it.scalars;
  const float gnorm_scale = it.gnorm_scale ? *it.gnorm_scale : 1.0f;
  const float update_scale = it.update_scale ? *it.update_scale : 1.0f;
  const bool bounded = it.block_wise != 0;

  alignas(64) float old[3][kBlockSize];       // dequantized states of this chunk
  alignas(64) float fresh[2][3][kBlockSize];  // updated states: this chunk, previous chunk
  alignas(64) float pbuf[kBlockSize];         // 16-bit parameters as float (old, then new)
  alignas(64) float gbuf[kBlockSize];         // 16-bit gradients as float
  alignas(64) int32_t keep_buf[kBlockSize];   // 16-bit parameters: -1 where updated
  Requant requant[2][3] = {};
  __m512d ulanes = _mm512_setzero_pd(), planes = _mm512_setzero_pd();
  uint32_t unit_max[3] = {0, 0, 0};

  const int64_t end = begin + len;
  int64_t prev = -1, prev_n = 0;  // the chunk waiting for requantization
  int cur = 0;
  for (int64_t c = begin;; c += kBlockSize) {
    const bool have = c < end;
    if (!have && (MODE == MODE_PREPARE || prev < 0)) break;
    const int64_t n = have ? (end - c < kBlockSize ? end - c : kBlockSize) : 0;
    const int64_t block = it.block_wise ? c / kBlockSize : 0;
    PS* pp = static_cast<PS*>(it.param) + c;
    const GS* gp = static_cast<const GS*>(it.grad) + c;
    if (have) {
      const int64_t ahead = c + kPrefetchChunks * kBlockSize;
      if (ahead < end) {
        const int64_t bytes = (end - ahead < kBlockSize ? end - ahead : kBlockSize);
        prefetch_range(static_cast<PS*>(it.param) + ahead, bytes * static_cast<int64_t>(sizeof(PS)));
        prefetch_range(static_cast<const GS*>(it.grad) + ahead, bytes * static_cast<int64_t>(sizeof(GS)));
        for (int j = 0; j < NV; ++j) prefetch_range(value_storage<ALGO, uint8_t>(it, j) + ahead, bytes);
      }
      dequantize_chunk<S0>(value_storage<ALGO, uint8_t>(it, 0) + c, n, value_absmax<ALGO>(it, 0)[block], old[0]);
      if (NV > 1) dequantize_chunk<S1>(value_storage<ALGO, uint8_t>(it, 1) + c, n, value_absmax<ALGO>(it, 1)[block], old[1]);
      if (NV > 2) dequantize_chunk<S2>(value_storage<ALGO, uint8_t>(it, 2) + c, n, value_absmax<ALGO>(it, 2)[block], old[2]);
      if (PE != ELEM_F32) {
        for (int64_t i = 0; i < n; ++i) pbuf[i] = Elem<PE>::load(pp[i]);
      }
      if (GE != ELEM_F32) {
        for (int64_t i = 0; i < n; ++i) gbuf[i] = Elem<GE>::load(gp[i]);
      }
    }
    float* pf = PE == ELEM_F32 ? reinterpret_cast<float*>(pp) : pbuf;
    const float* gf = GE == ELEM_F32 ? reinterpret_cast<const float*>(gp) : gbuf;
    BlockMax<S0> max0;
    BlockMax<S1> max1;
    BlockMax<S2> max2;

    // The update of the 16 elements at k (live: which of them exist; FULL: all 16).
    auto update16 = [&](int64_t k, __mmask16 live, auto full) {
      constexpr bool FULL = decltype(full)::value;
      const VecF p = FULL ? VecF::load(pf + k) : VecF::load(pf + k, live);
      const VecF g = FULL ? VecF::load(gf + k) : VecF::load(gf + k, live);
      const VecF v0 = FULL ? VecF::load(old[0] + k) : VecF::load(old[0] + k, live);
      const VecF v1 = NV > 1 ? (FULL ? VecF::load(old[1] + k) : VecF::load(old[1] + k, live)) : VecF::zero();
      const VecF v2 = NV > 2 ? (FULL ? VecF::load(old[2] + k) : VecF::load(old[2] + k, live)) : VecF::zero();
      const ElementOut<VecF> o = element_step<ALGO>(g, p, v0, v1, v2, gnorm_scale, update_scale, s);
      _mm512_store_ps(fresh[cur][0] + k, o.v0.v);  // whole groups: the buffers have room
      max0.template add<FULL>(o.v0, live);
      if (NV > 1) {
        _mm512_store_ps(fresh[cur][1] + k, o.v1.v);
        max1.template add<FULL>(o.v1, live);
      }
      if (NV > 2) {
        _mm512_store_ps(fresh[cur][2] + k, o.v2.v);
        max2.template add<FULL>(o.v2, live);
      }
      if (MODE == MODE_UPDATE) {
        if (PE == ELEM_F32) {
          const __mmask16 write = FULL ? o.keep.k : static_cast<__mmask16>(live & o.keep.k);
          _mm512_mask_storeu_ps(pf + k, write, o.p.v);  // skipped elements: bits untouched
        } else {
          _mm512_store_ps(pbuf + k, o.p.v);
          _mm512_store_si512(keep_buf + k, _mm512_movm_epi32(o.keep.k));
        }
      } else {
        ulanes = add_squares(ulanes, FULL ? o.d : VecF{_mm512_maskz_mov_ps(live, o.d.v)});
        planes = add_squares(planes, p);  // (masked loads: 0 past the end)
      }
    };

    const int64_t span = (MODE == MODE_UPDATE && prev_n > n) ? prev_n : n;
    for (int64_t i = 0; i < span; i += 64) {
      if (i + 64 <= n) {
        for (int64_t k = i; k < i + 64; k += 16) update16(k, static_cast<__mmask16>(0xffff), std::true_type());
      } else {
        for (int64_t k = i; k < n; k += 16) update16(k, lanes16(n - k), std::false_type());
      }
      if (MODE == MODE_UPDATE && i < prev_n) {
        const int64_t m = prev_n - i < 64 ? prev_n - i : 64;
        requantize64<S0>(fresh[cur ^ 1][0] + i, m, requant[cur ^ 1][0], value_storage<ALGO, uint8_t>(it, 0) + prev + i);
        if (NV > 1) requantize64<S1>(fresh[cur ^ 1][1] + i, m, requant[cur ^ 1][1], value_storage<ALGO, uint8_t>(it, 1) + prev + i);
        if (NV > 2) requantize64<S2>(fresh[cur ^ 1][2] + i, m, requant[cur ^ 1][2], value_storage<ALGO, uint8_t>(it, 2) + prev + i);
      }
    }

    if (have) {
      const uint32_t maxima[3] = {max0.bits(), NV > 1 ? max1.bits() : 0u, NV > 2 ? max2.bits() : 0u};
      if (MODE == MODE_PREPARE) {
        for (int j = 0; j < 3; ++j) unit_max[j] = max_u32(unit_max[j], maxima[j]);
      } else {
        for (int j = 0; j < NV; ++j) {
          // Block-wise: this block's new scale (the old one was read by the dequantization
          // above); tensor-wise: the maxima of the prepare pass.
          const float absmax = it.block_wise ? bits_float(maxima[j]) : given_absmax<ALGO>(it, j);
          if (it.block_wise) value_absmax<ALGO>(it, j)[block] = absmax;
          requant[cur][j] = requant_for(absmax, bounded);
        }
        if (PE != ELEM_F32) {
          for (int64_t i = 0; i < n; ++i) {
            const PS converted = Elem<PE>::store(pbuf[i]);
            pp[i] = keep_buf[i] ? converted : pp[i];
          }
        }
      }
    }
    prev = have ? c : -1;
    prev_n = n;
    cur ^= 1;
    if (!have) break;
  }
  if (MODE == MODE_PREPARE) {
    for (int j = 0; j < 3; ++j) out.max_bits[j] = unit_max[j];
    alignas(64) double lanes[kLanes];
    _mm512_store_pd(lanes, ulanes);
    out.unorm_sq = sum_lanes(lanes);
    _mm512_store_pd(lanes, planes);
    out.pnorm_sq = sum_lanes(lanes);
  }
}

}  // namespace avx512
PO_ISA_END
#endif
