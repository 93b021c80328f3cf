// Instruction-set levels. The kernel sources (kernels_*.cpp, isa_ops.cpp) are compiled once
// per level with that level's flags (setup.py) into the same library; api.cpp, compiled with
// the library's generic flags, picks a level at load time from CPUID (the way ATen's CPU
// capability dispatch works) and calls the kernels through that level's IsaOps.
//
// Every definition in a kernel source lives in the namespace pagedopt::cpu::PO_ISA_NS
// (isa_avx512, isa_avx2, isa_baseline; set by the build), so the copies of one inline
// function or template compiled for different levels have different symbol names and the
// linker can never substitute an AVX-512 copy into baseline code. (The shared math headers of
// native/include/pagedopt are always inlined, see PO_HD in common.h.)
#pragma once

#ifndef PO_ISA_NS
#define PO_ISA_NS isa_default  // a single-level build (e.g. a test compiling one source by hand)
#endif

#define PO_ISA_BEGIN \
  namespace pagedopt { \
  namespace cpu { \
  namespace PO_ISA_NS {
#define PO_ISA_END \
  } \
  } \
  }

namespace pagedopt {
namespace cpu {

// Level ids (po_isa() / po_select_isa(); pagedopt/backends/cpu.py ISA_LEVELS).
enum IsaLevel { ISA_BASELINE = 0, ISA_AVX2 = 1, ISA_AVX512 = 2, ISA_COUNT = 3 };

}  // namespace cpu
}  // namespace pagedopt
