// Argument checks shared by every backend (CPU, CUDA, Meta) of the k-means codebook ops
// (ops/kmeans_codebook.h): the same checks in the same order with the same messages, made before
// anything is allocated or written. Checks of label values run in the kernels, which report the
// first bad offset in row-major order; the throw_* functions turn it into the error.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <optional>
#include <vector>

#include "qext/kernels/codebook_grad.h"

namespace qext::ops::detail {

// The largest codebook: labels are stored in at most 8 bits.
constexpr int64_t kMaxCodebookSize = 256;

// kmeans_dequantize(centroids, labels, axis): centroids floating [k] without axis or [C, k] with
// one (C = labels.size(axis)), k in [1, 256]; labels uint8 / int32 / int64; same device. Returns
// the [outer, codebooks, inner] view of labels in row-major order.
kernels::CodebookLayout check_dequantize_args(const at::Tensor& centroids, const at::Tensor& labels,
                                              std::optional<int64_t> axis);

// _kmeans_centroid_grad(grad, labels, k, axis): grad floating with labels' shape, k in [1, 256],
// labels as above (any size along axis). Returns the layout as above.
kernels::CodebookLayout check_centroid_grad_args(const at::Tensor& grad, const at::Tensor& labels,
                                                 int64_t k, std::optional<int64_t> axis);

// Shape of the centroid gradient: [k] without axis, [codebooks, k] with one.
std::vector<int64_t> centroid_grad_shape(const kernels::CodebookLayout& layout,
                                         std::optional<int64_t> axis);

// The IndexError for the label at row-major `offset` of `labels` (outside [0, k)): names the value,
// its index and k. Reads one label (a device-to-host copy for CUDA tensors).
[[noreturn]] void throw_label_out_of_codebook(const at::Tensor& labels, int64_t offset, int64_t k,
                                              const char* op);

// pack_labels(labels, bits): labels uint8 / int32 / int64, bits in {1, 2, 4, 8}.
void check_pack_args(const at::Tensor& labels, int64_t bits);

// The ValueError for the label at row-major `offset` of `labels` (outside [0, 2^bits)).
[[noreturn]] void throw_label_too_wide(const at::Tensor& labels, int64_t offset, int64_t bits);

// unpack_labels(packed, bits, shape): bits in {1, 2, 4, 8}, no negative dimension in shape, packed
// a one-dimensional uint8 tensor of exactly packed_labels_bytes(prod(shape), bits) bytes. Returns
// prod(shape).
int64_t check_unpack_args(const at::Tensor& packed, int64_t bits, at::IntArrayRef shape);

// Calls f(L{}) with L the C++ type of a labels dtype: uint8_t, int32_t or int64_t.
template <typename F>
void visit_label_type(at::ScalarType dtype, F&& f) {
  switch (dtype) {
    case at::kByte:
      f(uint8_t{});
      break;
    case at::kInt:
      f(int32_t{});
      break;
    case at::kLong:
      f(int64_t{});
      break;
    default:
      TORCH_CHECK_TYPE(false, "labels must be uint8, int32 or int64, got ", dtype);
  }
}

// Calls f(V{}) with V the unsigned integer type of the width of a floating dtype (uint16_t,
// uint32_t or uint64_t): what a gather of its values copies.
template <typename F>
void visit_value_width(at::ScalarType dtype, F&& f) {
  switch (c10::elementSize(dtype)) {
    case 2:
      f(uint16_t{});
      break;
    case 4:
      f(uint32_t{});
      break;
    case 8:
      f(uint64_t{});
      break;
    default:
      TORCH_CHECK_TYPE(false, "centroids of dtype ", dtype, " are not supported");
  }
}

}  // namespace qext::ops::detail
