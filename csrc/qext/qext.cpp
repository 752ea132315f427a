#include "qext/qext.h"

namespace qext {

std::string version() { return "0.1.0"; }

bool with_cuda() {
#ifdef QEXT_WITH_CUDA
  return true;
#else
  return false;
#endif
}

namespace detail {
int link_anchor() { return 0; }
}  // namespace detail

}  // namespace qext
