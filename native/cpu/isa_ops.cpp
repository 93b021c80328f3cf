// One instruction-set level's entry point (compiled once per level, see isa.h): the kernel
// tables of every algorithm, the gradient norm loop and the test hooks' bodies, gathered into
// the IsaOps that api.cpp dispatches through.
#include "kernels.h"

PO_ISA_BEGIN

namespace {

// Sum of squares of the finite elements of one unit of a gradient, in kLanes fixed lanes.
template <int GE>
double grad_unit_norm_sq(const void* grad, int64_t begin, int64_t len) {
  typedef typename Elem<GE>::storage GS;
  const GS* __restrict__ g = static_cast<const GS*>(grad) + begin;
  double lanes[kLanes] = {0};
  alignas(64) float buf[kBlockSize];
  for (int64_t c = 0; c < len; c += kBlockSize) {
    const int64_t n = len - c < kBlockSize ? len - c : kBlockSize;
    for (int64_t i = 0; i < n; ++i) {
      const float x = Elem<GE>::load(g[c + i]);
      buf[i] = po_isfinite(x) ? x : 0.0f;
    }
    for (int64_t i = n; i < kBlockSize; ++i) buf[i] = 0.0f;
    accumulate_squares(buf, lanes);
  }
  return sum_lanes(lanes);
}

double grad_norm_sq(int32_t dtype, const void* grad, int64_t begin, int64_t len) {
  switch (dtype) {
    case ELEM_F32: return grad_unit_norm_sq<ELEM_F32>(grad, begin, len);
    case ELEM_F16: return grad_unit_norm_sq<ELEM_F16>(grad, begin, len);
    default: return grad_unit_norm_sq<ELEM_BF16>(grad, begin, len);
  }
}

// po_check_code_search() (pagedopt_cpu.h). Reference: quantize_value() = fix_code(count_below()).
// Within one sign the floats are monotone in bit order (increasing for +, decreasing for -),
// so count_below is tracked by a merge scan over the sorted thresholds (binary search at the
// start of each slice, and on every 4096th value as a cross-check of the scan itself).

#ifdef PO_HAVE_AVX512
// Codes of x[0..16) through the VBMI search (LATTICE: its lattice fast path), unbounded and
// bounded, as uint32 (the check below compares them with the reference).
template <bool LATTICE>
void vbmi_codes(int32_t is_signed, const float* x, uint32_t* out, uint32_t* out_bounded) {
  uint8_t codes[16], codes_bounded[16];
  if (is_signed) {
    vbmi::quantize<true, false, LATTICE>(x, 16, codes);
    vbmi::quantize<true, true, LATTICE>(x, 16, codes_bounded);
  } else {
    vbmi::quantize<false, false, LATTICE>(x, 16, codes);
    vbmi::quantize<false, true, LATTICE>(x, 16, codes_bounded);
  }
  for (int k = 0; k < 16; ++k) {
    out[k] = codes[k];
    out_bounded[k] = codes_bounded[k];
  }
}

// The same through the lattice with the table fallback (simd_lattice.h, no VBMI needed).
void lattice_table_codes(int32_t is_signed, const float* x, uint32_t* out, uint32_t* out_bounded) {
  uint8_t codes[16], codes_bounded[16];
  if (is_signed) {
    lattice512::quantize_lattice_table<true, false>(x, 16, codes);
    lattice512::quantize_lattice_table<true, true>(x, 16, codes_bounded);
  } else {
    lattice512::quantize_lattice_table<false, false>(x, 16, codes);
    lattice512::quantize_lattice_table<false, true>(x, 16, codes_bounded);
  }
  for (int k = 0; k < 16; ++k) {
    out[k] = codes[k];
    out_bounded[k] = codes_bounded[k];
  }
}
#endif

int64_t check_code_search(int32_t is_signed, uint32_t first_bits, uint32_t last_bits, uint32_t* first_mismatch,
                          int32_t num_threads) {
  const float* t = is_signed ? g_tables.thresholds_signed : g_tables.thresholds_unsigned;
  const bool negative = (first_bits >> 31) != 0;
  const int64_t first = first_bits, total = static_cast<int64_t>(last_bits) - first + 1;
  const int threads = num_threads < 1 ? 1 : num_threads;
  const int64_t slices = 256;
  int64_t mismatches = 0;
  uint32_t earliest = 0xffffffffu;
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads) reduction(+ : mismatches) reduction(min : earliest)
  for (int64_t slice = 0; slice < slices; ++slice) {
    const int64_t lo = first + total * slice / slices, hi = first + total * (slice + 1) / slices;
    if (lo >= hi) continue;
    int count = count_below(t, bits_float(static_cast<uint32_t>(lo)));
    for (int64_t group = lo; group < hi; group += 16) {
      const int64_t n = hi - group < 16 ? hi - group : 16;
      float x[16] = {0};
      uint32_t reference[16], fast[16], simd[16], simd_bounded[16], arith[16], arith_bounded[16], lattice[16],
          lattice_bounded[16], lattice_table[16], lattice_table_bounded[16];
      for (int64_t k = 0; k < n; ++k) {
        const int64_t b = group + k;
        x[k] = bits_float(static_cast<uint32_t>(b));
        if (x[k] != x[k]) {
          count = 255;  // NaN (count_below's own rule)
        } else if (!negative) {
          while (count < 255 && t[count] < x[k]) ++count;
        } else {
          while (count > 0 && !(t[count - 1] < x[k])) --count;
        }
        if ((b & 4095) == 0 && count != count_below(t, x[k])) count = -1000;  // scan broken: flag everything
        reference[k] = count < 0 ? 1000u : static_cast<uint32_t>(fix_code(count, x[k], is_signed != 0));
        fast[k] = is_signed ? lut_quantize_value<true>(g_tables.lut_signed, x[k])
                            : lut_quantize_value<false>(g_tables.lut_unsigned, x[k]);
        simd[k] = simd_bounded[k] = arith[k] = arith_bounded[k] = lattice[k] = lattice_bounded[k] = fast[k];
        lattice_table[k] = lattice_table_bounded[k] = fast[k];
      }
#ifdef PO_HAVE_AVX512
      // The kernels' AVX-512 search, also in its bounded form for |x| <= 1.
      const __m512 v = _mm512_loadu_ps(x);
      _mm512_storeu_si512(simd, is_signed ? avx512::quantize16<true, false>(v) : avx512::quantize16<false, false>(v));
      _mm512_storeu_si512(simd_bounded, is_signed ? avx512::quantize16<true, true>(v) : avx512::quantize16<false, true>(v));
      if (search_needs_vbmi(g_tables.code_search)) {  // the gather-free searches of VBMI CPUs (both)
        vbmi_codes<false>(is_signed, x, arith, arith_bounded);
        if (g_tables.lattice_ready) vbmi_codes<true>(is_signed, x, lattice, lattice_bounded);
      }
      if (g_tables.lattice_ready) lattice_table_codes(is_signed, x, lattice_table, lattice_table_bounded);  // any AVX-512 CPU
#elif defined(PO_HAVE_AVX2)
      // The avx2 level's search (8 lanes at a time).
      for (int h = 0; h < 2; ++h) {
        const __m256 v = _mm256_loadu_ps(x + 8 * h);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(simd + 8 * h),
                            is_signed ? avx2::quantize8<true>(v) : avx2::quantize8<false>(v));
      }
#endif
      for (int64_t k = 0; k < n; ++k) {
        const bool bounded = (float_bits(x[k]) & 0x7fffffffu) <= 0x3f800000u;
        if (reference[k] != fast[k] || reference[k] != (simd[k] & 0xffu) || reference[k] != arith[k] ||
            reference[k] != lattice[k] || reference[k] != lattice_table[k] ||
            (bounded && (reference[k] != (simd_bounded[k] & 0xffu) || reference[k] != arith_bounded[k] ||
                         reference[k] != lattice_bounded[k] || reference[k] != lattice_table_bounded[k]))) {
          ++mismatches;
          const uint32_t b = static_cast<uint32_t>(group + k);
          earliest = b < earliest ? b : earliest;
        }
      }
    }
  }
  if (first_mismatch) *first_mismatch = earliest;
  return mismatches;
}

void dequantize(int32_t is_signed, const uint8_t* codes, int64_t n, float absmax, float* out) {
  for (int64_t c = 0; c < n; c += kBlockSize) {
    const int64_t len = n - c < kBlockSize ? n - c : kBlockSize;
    if (is_signed) {
      dequantize_chunk<true>(codes + c, len, absmax, out + c);
    } else {
      dequantize_chunk<false>(codes + c, len, absmax, out + c);
    }
  }
}

void quantize_normalized(int32_t is_signed, const float* x, uint8_t* codes, int64_t n) {
  int64_t i = 0;
#ifdef PO_HAVE_AVX512
  if (search_needs_vbmi(g_tables.code_search)) {  // the kernels' search on VBMI CPUs
    const bool lattice = g_tables.code_search == kSearchLattice;
    if (is_signed) {
      (lattice ? vbmi::quantize<true, false, true> : vbmi::quantize<true, false, false>)(x, n, codes);
    } else {
      (lattice ? vbmi::quantize<false, false, true> : vbmi::quantize<false, false, false>)(x, n, codes);
    }
    return;
  }
  if (g_tables.code_search == kSearchLatticeTable) {  // the kernels' search on other AVX-512 CPUs
    (is_signed ? lattice512::quantize_lattice_table<true, false> : lattice512::quantize_lattice_table<false, false>)(x, n, codes);
    return;
  }
  for (; i + 16 <= n; i += 16) {  // the kernels' search
    const __m512 v = _mm512_loadu_ps(x + i);
    const __m512i c = is_signed ? avx512::quantize16<true, false>(v) : avx512::quantize16<false, false>(v);
    _mm512_mask_cvtepi32_storeu_epi8(codes + i, 0xffff, c);
  }
#elif defined(PO_HAVE_AVX2)
  for (; i + 8 <= n; i += 8) {  // the kernels' search
    alignas(32) uint32_t c[8];
    const __m256 v = _mm256_loadu_ps(x + i);
    _mm256_store_si256(reinterpret_cast<__m256i*>(c), is_signed ? avx2::quantize8<true>(v) : avx2::quantize8<false>(v));
    for (int k = 0; k < 8; ++k) codes[i + k] = static_cast<uint8_t>(c[k]);
  }
#endif
  for (; i < n; ++i) {
    codes[i] = static_cast<uint8_t>(is_signed ? lut_quantize_value<true>(g_tables.lut_signed, x[i])
                                              : lut_quantize_value<false>(g_tables.lut_unsigned, x[i]));
  }
}

#define PO_STRINGIFY2(x) #x
#define PO_STRINGIFY(x) PO_STRINGIFY2(x)

}  // namespace

const IsaOps& isa_ops() {
  static const IsaOps ops = {
      PO_STRINGIFY(PO_ISA_NS) + 4,  // "isa_avx512" -> "avx512"
      {&kernels_adam(), &kernels_ademamix(), &kernels_momentum(), &kernels_lion(), &kernels_rmsprop(),
       &kernels_adagrad()},
      &grad_norm_sq,
      &check_code_search,
      &dequantize,
      &quantize_normalized,
  };
  return ops;
}

PO_ISA_END
