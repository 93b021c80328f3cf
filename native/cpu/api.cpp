// C entry points: argument checks, the choice of instruction-set level, splitting items into
// units, the OpenMP loops and the fixed-order reductions. Compiled with the library's generic
// flags; the per-element work lives in kernels.h, compiled once per level (isa.h).
//
// Work is cut into units of at most kUnitElements elements of one item (a whole number of
// absmax blocks), independent of the thread count. Threads take units in a static schedule;
// per-unit partial results are reduced per item in unit order afterwards, so every result
// is the same for any number of threads.
#include <string.h>

#include <atomic>
#include <exception>
#include <string>
#include <vector>

#include "kernel_table.h"
#include "levels.h"
#include "pagedopt/code_lut.h"
#include "pagedopt_cpu.h"
#include "tables.h"

#ifndef PO_BUILD_INFO
#define PO_BUILD_INFO "unknown build"
#endif
#ifndef PO_REQUIRED_CPU_FLAGS
#define PO_REQUIRED_CPU_FLAGS ""
#endif

namespace pagedopt {
namespace cpu {

Tables g_tables;

thread_local std::string t_last_error;

int fail(int status, const std::string& message) {
  t_last_error = message;
  return status;
}

namespace {

constexpr int64_t kUnitElements = 64 * kBlockSize;  // 16384: ~100 KB of traffic per unit

// The code search a CPU gets (tables.h CodeSearch), from what `t` proved and whether VBMI
// dequantization is on (the CPU has VBMI, unless a test switched it off). Without VBMI the
// lattice falls back to the bucket table: its gather then serves only the rare unsure group
// (a gather per 16 values is slow on Skylake-SP / Cascade Lake, more so with the microcode
// mitigations for "Downfall", CVE-2022-40982, which make gathers several times slower).
int32_t default_code_search(const Tables& t) {
  if (t.dequant_vbmi && t.arith_ready) return t.lattice_ready ? kSearchLattice : kSearchArith;
  return t.lattice_ready ? kSearchLatticeTable : kSearchTable;
}


struct Unit {
  int64_t item;
  int64_t begin;
  int64_t len;
};

std::vector<Unit> make_units(const int64_t* numels, int64_t count) {
  std::vector<Unit> units;
  int64_t total = 0;
  for (int64_t i = 0; i < count; ++i) total += (numels[i] + kUnitElements - 1) / kUnitElements;
  units.reserve(static_cast<size_t>(total));
  for (int64_t i = 0; i < count; ++i) {
    for (int64_t b = 0; b < numels[i]; b += kUnitElements) {
      units.push_back(Unit{i, b, numels[i] - b < kUnitElements ? numels[i] - b : kUnitElements});
    }
  }
  return units;
}

// Run fn(unit_index) for every unit on num_threads threads (no OpenMP region for one thread).
template <class Fn>
void parallel_units(int64_t units, int32_t num_threads, const Fn& fn) {
  if (num_threads <= 1 || units <= 1) {
    for (int64_t u = 0; u < units; ++u) fn(u);
    return;
  }
  const int threads = static_cast<int>(num_threads < units ? num_threads : units);
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t u = 0; u < units; ++u) fn(u);
}

const KernelTable* table_for(int32_t algorithm) {
  if (algorithm < ALGO_ADAM || algorithm > ALGO_ADAGRAD) return nullptr;
  return ops().kernels[algorithm];
}

// Number of absmax entries per state value (kernels.h absmax_count()).
int64_t absmax_count(const po_item& it) {
  return it.block_wise ? (it.numel + kBlockSize - 1) / kBlockSize : 1;
}

uint32_t max_u32(uint32_t a, uint32_t b) { return a > b ? a : b; }

int num_states(int32_t algorithm) {
  return (algorithm == ALGO_ADAM || algorithm == ALGO_ADEMAMIX) ? 2 : 1;
}

bool valid_dtype(int32_t dtype) { return dtype == ELEM_F32 || dtype == ELEM_F16 || dtype == ELEM_BF16; }

// Checks one item; returns an empty string when it is usable.
std::string check_item(const po_item& it, int32_t algorithm, bool update) {
  const bool two = num_states(algorithm) == 2;
  if (it.numel < 0) return "numel is negative";
  if (!valid_dtype(it.param_dtype)) return "param_dtype is not 0 (f32), 1 (f16) or 2 (bf16)";
  if (!valid_dtype(it.grad_dtype)) return "grad_dtype is not 0 (f32), 1 (f16) or 2 (bf16)";
  if (it.numel > 0) {
    if (!it.param) return "param is NULL";
    if (!it.grad) return "grad is NULL";
    if (!it.state1) return "state1 is NULL";
    if (two && !it.state2) return "state2 is NULL for a 2-state algorithm";
  }
  if (it.quantized) {
    if (absmax_count(it) > 0 && !it.absmax1) return "absmax1 is NULL for 8-bit state";
    if (two && absmax_count(it) > 0 && !it.absmax2) return "absmax2 is NULL for 8-bit state";
    if (update && !it.block_wise) {
      if (!it.new_absmax1) return "new_absmax1 is NULL for tensor-wise 8-bit state (run prepare first)";
      if (two && !it.new_absmax2) return "new_absmax2 is NULL for tensor-wise 8-bit state (run prepare first)";
    }
  }
  return std::string();
}

int check_call(int32_t algorithm, const po_item* items, int64_t count, bool update) {
  if (!g_tables.ready) return fail(PO_ERR_NOT_READY, "po_init() has not succeeded");
  if (!table_for(algorithm)) return fail(PO_ERR_ARGUMENT, "algorithm " + std::to_string(algorithm) + " is unknown");
  if (count < 0) return fail(PO_ERR_ARGUMENT, "count is negative");
  if (count > 0 && !items) return fail(PO_ERR_ARGUMENT, "items is NULL");
  for (int64_t i = 0; i < count; ++i) {
    std::string problem = check_item(items[i], algorithm, update);
    if (!problem.empty()) return fail(PO_ERR_ARGUMENT, "item " + std::to_string(i) + ": " + problem);
  }
  return PO_OK;
}

UnitFn kernel_for(const KernelTable& table, const po_item& it, int mode) {
  return table.fn[it.quantized ? 1 : 0][it.param_dtype][it.grad_dtype][mode];
}

std::vector<int64_t> item_numels(const po_item* items, int64_t count) {
  std::vector<int64_t> numels(static_cast<size_t>(count));
  for (int64_t i = 0; i < count; ++i) numels[i] = items[i].numel;
  return numels;
}

// Test hook body: float -> fp16/bf16 conversions that differ from `expected` (NaN: any NaN).
// Integer-only, so it vectorizes (a test sweeps all 2^32 floats).
template <int ELEM>
int64_t count_conversion_mismatches(const float* __restrict__ x, const uint16_t* __restrict__ expected, int64_t n) {
  const uint32_t infinity = ELEM == ELEM_F16 ? 0x7c00u : 0x7f80u;
  uint32_t bad = 0;
  int64_t total = 0;
  for (int64_t c = 0; c < n; c += 1 << 20) {
    const int64_t len = n - c < (1 << 20) ? n - c : (1 << 20);
    for (int64_t i = c; i < c + len; ++i) {
      const uint32_t ours = Elem<ELEM>::store(x[i]);
      const uint32_t theirs = expected[i];
      const uint32_t both_nan = mask_below(infinity, ours & 0x7fffu) & mask_below(infinity, theirs & 0x7fffu);
      bad += mask_below(0u, ours ^ theirs) & ~both_nan & 1u;  // the bits differ
    }
    total += bad;
    bad = 0;
  }
  return total;
}

template <class Fn>
int guarded(const Fn& fn) {
  try {
    return fn();
  } catch (const std::exception& e) {
    return fail(PO_ERR_INTERNAL, std::string("internal error: ") + e.what());
  } catch (...) {
    return fail(PO_ERR_INTERNAL, "internal error: unknown exception");
  }
}

}  // namespace
}  // namespace cpu
}  // namespace pagedopt

using namespace pagedopt;
using namespace pagedopt::cpu;

extern "C" {

int po_abi_version(void) { return PO_ABI_VERSION; }

const char* po_build_info(void) { return PO_BUILD_INFO; }

const char* po_required_cpu_flags(void) { return PO_REQUIRED_CPU_FLAGS; }

const char* po_last_error(void) { return t_last_error.c_str(); }

int po_init(const float* qmap_signed, const float* qmap_unsigned, const float* thresholds_signed,
            const float* thresholds_unsigned) {
  return guarded([&]() -> int {
    if (!qmap_signed || !qmap_unsigned || !thresholds_signed || !thresholds_unsigned) {
      return fail(PO_ERR_ARGUMENT, "po_init: a map or threshold pointer is NULL");
    }
    static Tables fresh;  // build aside, then publish: a failed init leaves the old tables
    memset(&fresh, 0, sizeof(fresh));
    memcpy(fresh.qmap_signed, qmap_signed, 256 * sizeof(float));
    memcpy(fresh.qmap_unsigned, qmap_unsigned, 256 * sizeof(float));
    memcpy(fresh.thresholds_signed, thresholds_signed, 255 * sizeof(float));
    memcpy(fresh.thresholds_unsigned, thresholds_unsigned, 255 * sizeof(float));
    for (int i = 0; i < 256; ++i) {
      for (int k = 0; k < 4; ++k) {
        fresh.qmap_planes_signed[k][i] = static_cast<uint8_t>(float_bits(qmap_signed[i]) >> (8 * k));
        fresh.qmap_planes_unsigned[k][i] = static_cast<uint8_t>(float_bits(qmap_unsigned[i]) >> (8 * k));
      }
    }
    for (int i = 1; i < 255; ++i) {
      if (!(thresholds_signed[i - 1] < thresholds_signed[i]) || !(thresholds_unsigned[i - 1] < thresholds_unsigned[i])) {
        return fail(PO_ERR_ARGUMENT, "po_init: thresholds are not strictly increasing at index " + std::to_string(i));
      }
    }
    int bad = build_code_lut<true>(fresh.thresholds_signed, fresh.lut_signed);
    if (bad) return fail(PO_ERR_ARGUMENT, "po_init: signed map too dense for the code table (bucket " + std::to_string(bad) + ")");
    bad = build_code_lut<false>(fresh.thresholds_unsigned, fresh.lut_unsigned);
    if (bad) return fail(PO_ERR_ARGUMENT, "po_init: unsigned map too dense for the code table (bucket " + std::to_string(bad) + ")");
    fresh.search[0] = search_constants<true>();
    fresh.search[1] = search_constants<false>();
    fresh.dequant_vbmi = cpu_has_vbmi() ? 1 : 0;
    // The gather-free search needs VBMI and the dynamic maps' decade structure; a map it cannot
    // prove (code_arith.h) keeps the table search.
    fresh.arith_ready = build_arith_search<true>(fresh.thresholds_signed, fresh.arith[0]) == 0 &&
                                build_arith_search<false>(fresh.thresholds_unsigned, fresh.arith[1]) == 0;
    fresh.lattice_ready = fresh.arith_ready && build_lattice_search(fresh.arith[0], true, fresh.lattice[0]) == 0 &&
                          build_lattice_search(fresh.arith[1], false, fresh.lattice[1]) == 0;
    fresh.code_search = default_code_search(fresh);
    fresh.prefetch_chunks = cpu_is_amd() ? 0 : 2;
    fresh.ready = true;
    g_tables = fresh;
    int expected = -1;
    g_level.compare_exchange_strong(expected, best_level());
    return PO_OK;
  });
}

int po_update(int32_t algorithm, const po_item* items, int64_t count, int32_t num_threads, int64_t* nonfinite) {
  return guarded([&]() -> int {
    int status = check_call(algorithm, items, count, true);
    if (status != PO_OK) return status;
    const KernelTable& table = *table_for(algorithm);
    const std::vector<int64_t> numels = item_numels(items, count);
    const std::vector<Unit> units = make_units(numels.data(), count);
    std::vector<int64_t> skipped(units.size(), 0);
    parallel_units(static_cast<int64_t>(units.size()), num_threads, [&](int64_t u) {
      const Unit& unit = units[u];
      const po_item& it = items[unit.item];
      UnitPartial partial;
      partial.nonfinite = 0;
      kernel_for(table, it, MODE_UPDATE)(it, unit.begin, unit.len, partial);
      skipped[u] = partial.nonfinite;
    });
    if (nonfinite) {
      int64_t total = 0;
      for (int64_t n : skipped) total += n;
      *nonfinite = total;
    }
    // Tensor-wise 8-bit: every unit dequantized with the old absmax; publish the new one now.
    for (int64_t i = 0; i < count; ++i) {
      const po_item& it = items[i];
      if (!it.quantized || it.block_wise) continue;
      const int moments = algorithm == ALGO_ADEMAMIX ? 2 : 1;
      for (int m = 0; m < moments; ++m) it.absmax1[m] = it.new_absmax1[m];
      if (num_states(algorithm) == 2) it.absmax2[0] = it.new_absmax2[0];
    }
    return PO_OK;
  });
}

int po_prepare(int32_t algorithm, const po_item* items, int64_t count, int32_t want_norms,
               po_prepare_out* out, int32_t num_threads) {
  return guarded([&]() -> int {
    int status = check_call(algorithm, items, count, false);
    if (status != PO_OK) return status;
    if (count > 0 && !out) return fail(PO_ERR_ARGUMENT, "out is NULL");
    const KernelTable& table = *table_for(algorithm);
    const std::vector<int64_t> numels = item_numels(items, count);
    const std::vector<Unit> units = make_units(numels.data(), count);
    std::vector<UnitPartial> partials(units.size());
    parallel_units(static_cast<int64_t>(units.size()), num_threads, [&](int64_t u) {
      const Unit& unit = units[u];
      const po_item& it = items[unit.item];
      UnitPartial& p = partials[u];
      memset(&p, 0, sizeof(p));
      kernel_for(table, it, MODE_PREPARE)(it, unit.begin, unit.len, p);
    });
    for (int64_t i = 0; i < count; ++i) memset(&out[i], 0, sizeof(po_prepare_out));
    std::vector<uint32_t> max_bits(static_cast<size_t>(count) * 3, 0u);
    for (size_t u = 0; u < units.size(); ++u) {  // unit order: deterministic sums
      const int64_t i = units[u].item;
      for (int j = 0; j < 3; ++j) max_bits[i * 3 + j] = max_u32(max_bits[i * 3 + j], partials[u].max_bits[j]);
      out[i].unorm_sq += partials[u].unorm_sq;
      out[i].pnorm_sq += partials[u].pnorm_sq;
    }
    const bool ademamix = algorithm == ALGO_ADEMAMIX;
    for (int64_t i = 0; i < count; ++i) {
      out[i].max1[0] = bits_float(max_bits[i * 3 + 0]);
      out[i].max1[1] = ademamix ? bits_float(max_bits[i * 3 + 1]) : 0.0f;
      out[i].max2 = bits_float(max_bits[i * 3 + (ademamix ? 2 : 1)]);
      if (!want_norms) out[i].unorm_sq = out[i].pnorm_sq = 0.0;
    }
    return PO_OK;
  });
}

int po_grad_norm_sq(const void* const* grads, const int64_t* numels, const int32_t* dtypes, int64_t count,
                    double* out, int32_t num_threads) {
  return guarded([&]() -> int {
    if (count < 0) return fail(PO_ERR_ARGUMENT, "count is negative");
    if (count > 0 && (!grads || !numels || !dtypes || !out)) return fail(PO_ERR_ARGUMENT, "an array argument is NULL");
    for (int64_t i = 0; i < count; ++i) {
      if (numels[i] < 0) return fail(PO_ERR_ARGUMENT, "gradient " + std::to_string(i) + ": numel is negative");
      if (!valid_dtype(dtypes[i])) return fail(PO_ERR_ARGUMENT, "gradient " + std::to_string(i) + ": dtype is unknown");
      if (numels[i] > 0 && !grads[i]) return fail(PO_ERR_ARGUMENT, "gradient " + std::to_string(i) + ": pointer is NULL");
    }
    const std::vector<Unit> units = make_units(numels, count);
    std::vector<double> partials(units.size(), 0.0);
    const IsaOps& level = ops();
    parallel_units(static_cast<int64_t>(units.size()), num_threads, [&](int64_t u) {
      const Unit& unit = units[u];
      const void* g = grads[unit.item];
      partials[u] = level.grad_norm_sq(dtypes[unit.item], g, unit.begin, unit.len);
    });
    for (int64_t i = 0; i < count; ++i) out[i] = 0.0;
    for (size_t u = 0; u < units.size(); ++u) out[units[u].item] += partials[u];
    return PO_OK;
  });
}

// ---- test hooks ----------------------------------------------------------------------------

int64_t po_check_code_search(int32_t is_signed, uint32_t first_bits, uint32_t last_bits, uint32_t* first_mismatch,
                             int32_t num_threads) {
  if (!g_tables.ready) {
    t_last_error = "po_init() has not succeeded";
    return -1;
  }
  if ((first_bits >> 31) != (last_bits >> 31) || first_bits > last_bits) {
    t_last_error = "po_check_code_search: the range must be ordered and must not cross the sign bit";
    return -1;
  }
  return ops().check_code_search(is_signed, first_bits, last_bits, first_mismatch, num_threads);
}

int po_dequantize(int32_t is_signed, const uint8_t* codes, int64_t n, float absmax, float* out) {
  if (!g_tables.ready) return fail(PO_ERR_NOT_READY, "po_init() has not succeeded");
  ops().dequantize(is_signed, codes, n, absmax, out);
  return PO_OK;
}

int po_quantize_normalized(int32_t is_signed, const float* x, uint8_t* codes, int64_t n) {
  if (!g_tables.ready) return fail(PO_ERR_NOT_READY, "po_init() has not succeeded");
  ops().quantize_normalized(is_signed, x, codes, n);
  return PO_OK;
}

int po_set_dequantize_vbmi(int32_t enable) {
  if (!g_tables.ready) return fail(PO_ERR_NOT_READY, "po_init() has not succeeded");
  if (enable && !cpu_has_vbmi()) return fail(PO_ERR_ARGUMENT, "this CPU lacks avx512vbmi");
  g_tables.dequant_vbmi = enable ? 1 : 0;
  g_tables.code_search = default_code_search(g_tables);  // what a CPU with (without) VBMI gets
  return PO_OK;
}

int po_set_prefetch(int32_t chunks) {
  if (!g_tables.ready) return fail(PO_ERR_NOT_READY, "po_init() has not succeeded");
  if (chunks < 0 || chunks > 16) return fail(PO_ERR_ARGUMENT, "prefetch distance must be 0..16 chunks, got " + std::to_string(chunks));
  g_tables.prefetch_chunks = chunks;
  return PO_OK;
}

int po_get_prefetch() { return g_tables.ready ? g_tables.prefetch_chunks : -1; }

int po_code_search(void) { return g_tables.ready ? g_tables.code_search : -1; }

int po_set_code_search(int32_t mode) {
  if (!g_tables.ready) return fail(PO_ERR_NOT_READY, "po_init() has not succeeded");
  if (mode < 0 || mode > 3) return fail(PO_ERR_ARGUMENT, "code search mode must be 0, 1, 2 or 3, got " + std::to_string(mode));
  if (search_needs_vbmi(mode) && !cpu_has_vbmi()) return fail(PO_ERR_ARGUMENT, "this CPU lacks avx512vbmi");
  if (mode == kSearchArith && !g_tables.arith_ready) {
    return fail(PO_ERR_ARGUMENT, "the maps do not allow the arithmetic code search");
  }
  if ((mode == kSearchLattice || mode == kSearchLatticeTable) && !g_tables.lattice_ready) {
    return fail(PO_ERR_ARGUMENT, "the maps do not allow the lattice code search");
  }
  g_tables.code_search = mode;
  return PO_OK;
}

int po_set_code_search_vbmi(int32_t mode) { return po_set_code_search(mode); }

int po_convert_from_float(int32_t dtype, const float* x, uint16_t* out, int64_t n) {
  if (dtype != ELEM_F16 && dtype != ELEM_BF16) return fail(PO_ERR_ARGUMENT, "dtype must be 1 (f16) or 2 (bf16)");
  for (int64_t i = 0; i < n; ++i) out[i] = dtype == ELEM_F16 ? float_to_half(x[i]) : float_to_bf16(x[i]);
  return PO_OK;
}

int po_convert_to_float(int32_t dtype, const uint16_t* x, float* out, int64_t n) {
  if (dtype != ELEM_F16 && dtype != ELEM_BF16) return fail(PO_ERR_ARGUMENT, "dtype must be 1 (f16) or 2 (bf16)");
  for (int64_t i = 0; i < n; ++i) out[i] = dtype == ELEM_F16 ? half_to_float(x[i]) : bf16_to_float(x[i]);
  return PO_OK;
}

int64_t po_count_conversion_mismatches(int32_t dtype, const float* x, const uint16_t* expected, int64_t n) {
  if (dtype == ELEM_F16) return count_conversion_mismatches<ELEM_F16>(x, expected, n);
  if (dtype == ELEM_BF16) return count_conversion_mismatches<ELEM_BF16>(x, expected, n);
  return -1;
}

}  // extern "C"
