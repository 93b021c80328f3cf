// Kernel instantiations for ALGO_ADAGRAD at one instruction-set level (one translation unit per
// algorithm and level: parallel builds; see isa.h).
#include "kernels.h"

PO_ISA_BEGIN

const KernelTable& kernels_adagrad() {
  static const KernelTable table = make_kernel_table<ALGO_ADAGRAD>();
  return table;
}

PO_ISA_END
