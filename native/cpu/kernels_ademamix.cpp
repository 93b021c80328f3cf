// Kernel instantiations for ALGO_ADEMAMIX (one translation unit per algorithm: parallel builds).
#include "kernels.h"

namespace pagedopt {
namespace cpu {

const KernelTable& kernels_ademamix() {
  static const KernelTable table = make_kernel_table<ALGO_ADEMAMIX>();
  return table;
}

}  // namespace cpu
}  // namespace pagedopt
