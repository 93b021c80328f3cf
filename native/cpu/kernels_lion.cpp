// Kernel instantiations for ALGO_LION (one translation unit per algorithm: parallel builds).
#include "kernels.h"

namespace pagedopt {
namespace cpu {

const KernelTable& kernels_lion() {
  static const KernelTable table = make_kernel_table<ALGO_LION>();
  return table;
}

}  // namespace cpu
}  // namespace pagedopt
