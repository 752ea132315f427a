// Meta (shape-only) kernels of the look-up-table ops: the same argument checks as the CPU and CUDA
// kernels (all but the label values, which a meta tensor does not have).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "qext/ops/common/kmeans_lut_args.h"

namespace qext::ops {
namespace {

at::Tensor kmeans_linear_meta(const at::Tensor& input, const at::Tensor& packed_labels,
                              const at::Tensor& centroids, int64_t bits,
                              at::IntArrayRef weight_shape, const std::optional<at::Tensor>& bias) {
  const auto call = detail::check_lut_linear(input, packed_labels, centroids, bits, weight_shape,
                                             bias, "qext::kmeans_linear");
  return at::empty(call.out_sizes, input.options());
}

at::Tensor kmeans_decode_meta(const at::Tensor& packed_labels, const at::Tensor& centroids,
                              int64_t bits, at::IntArrayRef weight_shape) {
  detail::check_lut_weight(packed_labels, centroids, bits, weight_shape, 0, "qext::kmeans_decode");
  return at::empty(weight_shape, centroids.options());
}

}  // namespace

TORCH_LIBRARY_IMPL(qext, Meta, m) {
  m.impl("kmeans_linear", kmeans_linear_meta);
  m.impl("kmeans_decode", kmeans_decode_meta);
}

}  // namespace qext::ops
