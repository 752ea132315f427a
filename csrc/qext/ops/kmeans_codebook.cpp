// Schemas of the k-means codebook ops and their public C++ API.
#include "qext/ops/kmeans_codebook.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

namespace qext::ops {

at::Tensor kmeans_dequantize(const at::Tensor& centroids, const at::Tensor& labels,
                             std::optional<int64_t> axis, bool mean) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("qext::kmeans_dequantize", "")
                       .typed<decltype(kmeans_dequantize)>();
  return op.call(centroids, labels, axis, mean);
}

at::Tensor pack_labels(const at::Tensor& labels, int64_t bits) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("qext::pack_labels", "")
                       .typed<decltype(pack_labels)>();
  return op.call(labels, bits);
}

at::Tensor unpack_labels(const at::Tensor& packed, int64_t bits, at::IntArrayRef shape) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("qext::unpack_labels", "")
                       .typed<decltype(unpack_labels)>();
  return op.call(packed, bits, shape);
}

TORCH_LIBRARY_FRAGMENT(qext, m) {
  m.def(
      "kmeans_dequantize(Tensor centroids, Tensor labels, int? axis=None, bool mean=False) -> "
      "Tensor");
  // The backward of kmeans_dequantize: the centroid gradient ([k], or [C, k] with axis) in grad's
  // dtype, summed (or averaged, mean=True) per label. Differentiable in grad (double backward).
  m.def(
      "_kmeans_centroid_grad(Tensor grad, Tensor labels, int k, int? axis=None, bool mean=False) "
      "-> Tensor");
  m.def("pack_labels(Tensor labels, int bits) -> Tensor");
  m.def("unpack_labels(Tensor packed, int bits, int[] shape) -> Tensor");
}

}  // namespace qext::ops
