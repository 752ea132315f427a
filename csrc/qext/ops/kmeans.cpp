// Schema of the k-means clustering op and its public C++ API.
#include "qext/ops/kmeans.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

namespace qext::ops {

std::tuple<at::Tensor, at::Tensor> kmeans(const at::Tensor& weight, int64_t k,
                                          std::optional<int64_t> axis, c10::string_view init,
                                          int64_t max_iters, int64_t seed) {
  static auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("qext::kmeans", "").typed<decltype(kmeans)>();
  return op.call(weight, k, axis, init, max_iters, seed);
}

TORCH_LIBRARY_FRAGMENT(qext, m) {
  m.def(
      "kmeans(Tensor weight, int k, int? axis=None, str init=\"linear\", int max_iters=30, "
      "int seed=0) -> (Tensor centroids, Tensor labels)");
}

}  // namespace qext::ops
