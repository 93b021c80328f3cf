// The avx512 level's 8-bit update of one unit: requantize64() and unit_8bit(). No include
// guard: kernel_8bit_avx512.h includes this file twice, once into namespace avx512 (table
// search, PO_UNIT_VBMI 0) and once into namespace avx512_vbmi under a VBMI target pragma
// (arithmetic search, PO_UNIT_VBMI 1), so the search inlines into the loop in both copies.
// (Everything else the copies use is shared, in kernel_8bit_avx512.h.) PO_UNIT_NS names the
// namespace: calls to requantize64() are qualified, else argument-dependent lookup through
// the shared Requant type would find both copies.

// Codes of x[0..n) (n <= 64) under r into codes[0..n): the lattice with the table search
// as its fallback, or the table search alone (a gather per 16 values); in the VBMI copy of
// this file the searches of simd_vbmi.h.
template <bool SIGNED>
__attribute__((always_inline)) inline void requantize64(const float* x, int64_t n, const Requant& r, uint8_t* codes) {
  __m512i packed;
  if (r.kind == Requant::kZero) {
    packed = _mm512_set1_epi8(static_cast<char>(SIGNED ? kSignedZeroCode : 0));
  } else {
    __m512 q[4];
    for (int k = 0; k < 4; ++k) {
      const __m512 v = n >= 64 ? _mm512_loadu_ps(x + 16 * k) : _mm512_maskz_loadu_ps(lanes16(n - 16 * k), x + 16 * k);
      q[k] = r.kind == Requant::kDivide ? _mm512_div_ps(v, _mm512_set1_ps(r.absmax))
                                        : _mm512_mul_ps(v, _mm512_set1_ps(r.inv_absmax));
    }
#if PO_UNIT_VBMI
    if (g_tables.code_search == kSearchLattice) {
      packed = r.kind == Requant::kMultiplyBounded ? vbmi::search64_lattice<SIGNED, true>(q)
                                                   : vbmi::search64_lattice<SIGNED, false>(q);
    } else {
      packed = r.kind == Requant::kMultiplyBounded ? vbmi::search64<SIGNED, true>(q) : vbmi::search64<SIGNED, false>(q);
    }
#else
    if (g_tables.code_search == kSearchLatticeTable) {
      packed = r.kind == Requant::kMultiplyBounded ? lattice512::search64_lattice_table<SIGNED, true>(q)
                                                   : lattice512::search64_lattice_table<SIGNED, false>(q);
    } else {
      __m512i c[4];
      for (int k = 0; k < 4; ++k) {
        c[k] = r.kind == Requant::kMultiplyBounded ? code_bits<SIGNED, true>(q[k]) : code_bits<SIGNED, false>(q[k]);
      }
      packed = pack_codes(c[0], c[1], c[2], c[3]);
    }
#endif
  }
  if (n >= 64) {
    _mm512_storeu_si512(codes, packed);
  } else {
    _mm512_mask_storeu_epi8(codes, lanes64(n), packed);
  }
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
  const int64_t prefetch_chunks = g_tables.prefetch_chunks;
  // Block maxima: the update's new block scales; in prepare mode only the tensor-wise scale
  // needs them (block-wise prepare computes just the trust ratio's norms).
  const bool track_max = MODE == MODE_UPDATE || !it.block_wise;

  alignas(64) float old[3][kBlockSize];       // dequantized states of this chunk
  alignas(64) float fresh[2][3][kBlockSize];  // updated states: this chunk, previous chunk
  alignas(64) float pbuf[kBlockSize];         // 16-bit parameters as float (old, then new)
  alignas(64) float gbuf[kBlockSize];         // 16-bit gradients as float
  alignas(64) int32_t keep_buf[kBlockSize];   // 16-bit parameters: -1 where updated
  Requant requant[2][3] = {};
  __m512d ulanes = _mm512_setzero_pd(), planes = _mm512_setzero_pd();
  uint32_t unit_max[3] = {0, 0, 0};
  int64_t nonfinite = 0;  // update mode: NaN/Inf gradient elements

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
      const int64_t ahead = c + prefetch_chunks * kBlockSize;
      if (prefetch_chunks && ahead < end) {
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
      if (MODE == MODE_UPDATE) {  // (prepare requantizes nothing: no new states to keep)
        _mm512_store_ps(fresh[cur][0] + k, o.v0.v);  // whole groups: the buffers have room
        if (NV > 1) _mm512_store_ps(fresh[cur][1] + k, o.v1.v);
        if (NV > 2) _mm512_store_ps(fresh[cur][2] + k, o.v2.v);
      }
      if (track_max) {
        max0.template add<FULL>(o.v0, live);
        if (NV > 1) max1.template add<FULL>(o.v1, live);
        if (NV > 2) max2.template add<FULL>(o.v2, live);
      }
      if (MODE == MODE_UPDATE) {
        // NaN/Inf gradient elements (fpclass: QNaN, SNaN, +Inf, -Inf) for the non-finite watch
        nonfinite += __builtin_popcount(static_cast<unsigned>(_mm512_fpclass_ps_mask(g.v, 0x99) & live));
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
        PO_UNIT_NS::requantize64<S0>(fresh[cur ^ 1][0] + i, m, requant[cur ^ 1][0], value_storage<ALGO, uint8_t>(it, 0) + prev + i);
        if (NV > 1) PO_UNIT_NS::requantize64<S1>(fresh[cur ^ 1][1] + i, m, requant[cur ^ 1][1], value_storage<ALGO, uint8_t>(it, 1) + prev + i);
        if (NV > 2) PO_UNIT_NS::requantize64<S2>(fresh[cur ^ 1][2] + i, m, requant[cur ^ 1][2], value_storage<ALGO, uint8_t>(it, 2) + prev + i);
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
  if (MODE == MODE_UPDATE) out.nonfinite = nonfinite;
  if (MODE == MODE_PREPARE) {
    for (int j = 0; j < 3; ++j) out.max_bits[j] = unit_max[j];
    alignas(64) double lanes[kLanes];
    _mm512_store_pd(lanes, ulanes);
    out.unorm_sq = sum_lanes(lanes);
    _mm512_store_pd(lanes, planes);
    out.pnorm_sq = sum_lanes(lanes);
  }
}

