// Kernel instantiations for ALGO_MOMENTUM (one translation unit per algorithm: parallel builds).
#include "kernels.h"

namespace pagedopt {
namespace cpu {

const KernelTable& kernels_momentum() {
  static const KernelTable table = make_kernel_table<ALGO_MOMENTUM>();
  return table;
}

}  // namespace cpu
}  // namespace pagedopt
