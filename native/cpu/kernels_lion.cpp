// Kernel instantiations for ALGO_LION at one instruction-set level (one translation unit per
// algorithm and level: parallel builds; see isa.h).
#include "kernels.h"

PO_ISA_BEGIN

const KernelTable& kernels_lion() {
  static const KernelTable table = make_kernel_table<ALGO_LION>();
  return table;
}

PO_ISA_END
