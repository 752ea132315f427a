// Schemas of the look-up-table ops on packed k-means labels and their public C++ API.
#include "qext/ops/kmeans_lut.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

namespace qext::ops {

at::Tensor kmeans_linear(const at::Tensor& input, const at::Tensor& packed_labels,
                         const at::Tensor& centroids, int64_t bits, at::IntArrayRef weight_shape,
                         const std::optional<at::Tensor>& bias) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("qext::kmeans_linear", "")
                       .typed<decltype(kmeans_linear)>();
  return op.call(input, packed_labels, centroids, bits, weight_shape, bias);
}

at::Tensor kmeans_decode(const at::Tensor& packed_labels, const at::Tensor& centroids, int64_t bits,
                         at::IntArrayRef weight_shape) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("qext::kmeans_decode", "")
                       .typed<decltype(kmeans_decode)>();
  return op.call(packed_labels, centroids, bits, weight_shape);
}

at::Tensor kmeans_linear_reference(const at::Tensor& input, const at::Tensor& weight,
                                   const std::optional<at::Tensor>& bias) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("qext::_kmeans_linear_reference", "")
                       .typed<decltype(kmeans_linear_reference)>();
  return op.call(input, weight, bias);
}

TORCH_LIBRARY_FRAGMENT(qext, m) {
  m.def(
      "kmeans_linear(Tensor input, Tensor packed_labels, Tensor centroids, int bits, "
      "int[] weight_shape, Tensor? bias=None) -> Tensor");
  m.def(
      "kmeans_decode(Tensor packed_labels, Tensor centroids, int bits, int[] weight_shape) -> "
      "Tensor");
  m.def("_kmeans_linear_reference(Tensor input, Tensor weight, Tensor? bias=None) -> Tensor");
}

}  // namespace qext::ops
