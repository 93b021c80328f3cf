// Kernel instantiations for ALGO_RMSPROP (one translation unit per algorithm: parallel builds).
#include "kernels.h"

namespace pagedopt {
namespace cpu {

const KernelTable& kernels_rmsprop() {
  static const KernelTable table = make_kernel_table<ALGO_RMSPROP>();
  return table;
}

}  // namespace cpu
}  // namespace pagedopt
