// The choice of instruction-set level: which levels this library holds, which this CPU can
// run (CPUID through __builtin_cpu_supports), the level in use, and the C entry points that
// report and select it (po_isa*, po_select_isa). Compiled with the library's generic flags.
#include <atomic>
#include <string>

#include "kernel_table.h"
#include "levels.h"
#include "pagedopt_cpu.h"

namespace pagedopt {
namespace cpu {

// The levels compiled into this library (setup.py defines PO_LEVEL_<NAME> for each).
namespace isa_baseline {
const IsaOps& isa_ops();
}
#ifdef PO_LEVEL_AVX2
namespace isa_avx2 {
const IsaOps& isa_ops();
}
#endif
#ifdef PO_LEVEL_AVX512
namespace isa_avx512 {
const IsaOps& isa_ops();
}
#endif


// The CPU features a level's flags allow (setup.py: avx2 = -mavx2 -mfma -mf16c -mbmi -mbmi2
// -mpopcnt; avx512 adds -mavx512f/bw/vl/dq/cd), space-separated, that this CPU lacks.
// __builtin_cpu_supports also checks that the OS saves the vector registers (XGETBV).
std::string missing_features(int level) {
  std::string missing;
#ifdef PO_X86
  __builtin_cpu_init();
#define PO_NEED(feature) \
  if (!__builtin_cpu_supports(feature)) missing += (missing.empty() ? "" : " ") + std::string(feature)
  if (level >= ISA_AVX2) {
    PO_NEED("avx2");
    PO_NEED("fma");
    PO_NEED("f16c");
    PO_NEED("bmi");
    PO_NEED("bmi2");
    PO_NEED("popcnt");
  }
  if (level >= ISA_AVX512) {
    PO_NEED("avx512f");
    PO_NEED("avx512bw");
    PO_NEED("avx512vl");
    PO_NEED("avx512dq");
    PO_NEED("avx512cd");
  }
#undef PO_NEED
#else
  if (level > ISA_BASELINE) missing = "x86-64";
#endif
  return missing;
}

const IsaOps* compiled_level(int level) {
  switch (level) {
    case ISA_BASELINE: return &isa_baseline::isa_ops();
#ifdef PO_LEVEL_AVX2
    case ISA_AVX2: return &isa_avx2::isa_ops();
#endif
#ifdef PO_LEVEL_AVX512
    case ISA_AVX512: return &isa_avx512::isa_ops();
#endif
    default: return nullptr;
  }
}

bool usable_level(int level) { return compiled_level(level) != nullptr && missing_features(level).empty(); }

int best_level() {
  for (int level = ISA_COUNT - 1; level > ISA_BASELINE; --level) {
    if (usable_level(level)) return level;
  }
  return ISA_BASELINE;
}

bool cpu_has_vbmi() {
#ifdef PO_X86
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512vbmi");
#else
  return false;
#endif
}

bool cpu_is_amd() {
#ifdef PO_X86
  __builtin_cpu_init();
  return __builtin_cpu_is("amd");
#else
  return false;
#endif
}

std::atomic<int> g_level{-1};  // (levels.h)

const IsaOps& ops() {
  int level = g_level.load(std::memory_order_acquire);
  return *compiled_level(level < 0 ? ISA_BASELINE : level);
}

}  // namespace cpu
}  // namespace pagedopt

using namespace pagedopt;
using namespace pagedopt::cpu;

extern "C" {

int po_isa(void) {
  const int level = g_level.load(std::memory_order_acquire);
  return level < 0 ? best_level() : level;
}

int po_isa_compiled(int32_t level) { return compiled_level(level) != nullptr ? 1 : 0; }

const char* po_isa_missing_features(int32_t level) {
  static thread_local std::string missing;
  missing = missing_features(level);
  return missing.c_str();
}

int po_select_isa(int32_t level) {
  if (level < ISA_BASELINE || level >= ISA_COUNT) {
    return fail(PO_ERR_ARGUMENT, "level " + std::to_string(level) + " is not 0 (baseline), 1 (avx2) or 2 (avx512)");
  }
  if (!compiled_level(level)) return fail(PO_ERR_ARGUMENT, "this library was built without that level");
  const std::string missing = missing_features(level);
  if (!missing.empty()) return fail(PO_ERR_ARGUMENT, "this CPU lacks " + missing);
  g_level.store(level, std::memory_order_release);
  return PO_OK;
}

}  // extern "C"
