// Kernel instantiations for ALGO_ADAGRAD (one translation unit per algorithm: parallel builds).
#include "kernels.h"

namespace pagedopt {
namespace cpu {

const KernelTable& kernels_adagrad() {
  static const KernelTable table = make_kernel_table<ALGO_ADAGRAD>();
  return table;
}

}  // namespace cpu
}  // namespace pagedopt
