// Kernel instantiations for ALGO_ADAM (one translation unit per algorithm: parallel builds).
#include "kernels.h"

namespace pagedopt {
namespace cpu {

const KernelTable& kernels_adam() {
  static const KernelTable table = make_kernel_table<ALGO_ADAM>();
  return table;
}

}  // namespace cpu
}  // namespace pagedopt
