// Meta (shape-only) kernels of the k-means codebook ops, for fake tensors and torch.compile: every
// check that does not read label values, and the output shapes and dtypes.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "qext/kernels/packed_labels.h"
#include "qext/ops/common/codebook_args.h"

namespace qext::ops {
namespace {

at::Tensor kmeans_dequantize_meta(const at::Tensor& centroids, const at::Tensor& labels,
                                  std::optional<int64_t> axis, bool mean) {
  detail::check_dequantize_args(centroids, labels, axis);
  return at::empty(labels.sizes(), centroids.options());
}

at::Tensor kmeans_centroid_grad_meta(const at::Tensor& grad, const at::Tensor& labels, int64_t k,
                                     std::optional<int64_t> axis, bool mean) {
  const auto layout = detail::check_centroid_grad_args(grad, labels, k, axis);
  return at::empty(detail::centroid_grad_shape(layout, axis), grad.options());
}

at::Tensor pack_labels_meta(const at::Tensor& labels, int64_t bits) {
  detail::check_pack_args(labels, bits);
  return at::empty({kernels::packed_labels_bytes(labels.numel(), bits)},
                   labels.options().dtype(at::kByte));
}

at::Tensor unpack_labels_meta(const at::Tensor& packed, int64_t bits, at::IntArrayRef shape) {
  detail::check_unpack_args(packed, bits, shape);
  return at::empty(shape, packed.options().dtype(at::kByte));
}

}  // namespace

TORCH_LIBRARY_IMPL(qext, Meta, m) {
  m.impl("kmeans_dequantize", kmeans_dequantize_meta);
  m.impl("_kmeans_centroid_grad", kmeans_centroid_grad_meta);
  m.impl("pack_labels", pack_labels_meta);
  m.impl("unpack_labels", unpack_labels_meta);
}

}  // namespace qext::ops
