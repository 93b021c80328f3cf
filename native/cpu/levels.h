// The instruction-set level in use and what the C entry points need of it (levels.cpp), and
// the library's error reporting (api.cpp). Internal: not part of the C ABI.
#pragma once
#include <atomic>
#include <string>

#include "kernel_table.h"

#if defined(__x86_64__) || defined(__i386__)
#define PO_X86 1
#endif

namespace pagedopt {
namespace cpu {

// The level in use (po_select_isa); -1 until chosen, at po_init() when not selected before.
extern std::atomic<int> g_level;

const IsaOps* compiled_level(int level);  // nullptr when this library lacks it
std::string missing_features(int level);  // the CPU features the level needs that this CPU lacks
int best_level();                          // the best level compiled in that this CPU runs
const IsaOps& ops();                       // the level in use (baseline before po_init)
bool cpu_has_vbmi();
bool cpu_is_amd();

// Records `message` for po_last_error() and returns `status`.
int fail(int status, const std::string& message);

}  // namespace cpu
}  // namespace pagedopt
