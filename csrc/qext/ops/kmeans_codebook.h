// K-means (Deep Compression) codebook operators: the trainable dequantization weight =
// centroids[labels] with centroid gradients, and the packed storage of the labels.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>

namespace qext::ops {

// out[j] = centroids[labels[j]] (axis empty: centroids [k]), or centroids[c, labels[j]] with c the
// index of element j along `axis` (centroids [C, k], C = labels.size(axis); negative axis counts
// from the end). centroids: floating, k in [1, 256]; labels: uint8, int32 or int64 of any shape,
// values in [0, k) (IndexError naming the first bad value otherwise). The output has labels'
// shape and centroids' dtype, and is contiguous.
// Gradient (centroids only): dL/dC[c][b] = sum of dL/dout[j] over the elements j of codebook c
// with label b; with mean = true divided by the cluster's size (0 for an empty cluster). The
// forward does not depend on `mean`. mean = true is not the derivative of the forward: it is
// the centroid update of a k-means step (each centroid moves by its cluster's mean gradient).
// The sums are in double and deterministic: on the CPU the same bits for every thread count, on
// CUDA the same bits on every run (no floating-point atomics); CPU and CUDA add in different
// orders and agree to double rounding. On CUDA, the label check costs one device-to-host copy (a
// stream synchronisation) per call, forward and backward alike.
at::Tensor kmeans_dequantize(const at::Tensor& centroids, const at::Tensor& labels,
                             std::optional<int64_t> axis = std::nullopt, bool mean = false);

// labels (uint8, int32 or int64, values in [0, 2^bits)) packed at bits in {1, 2, 4, 8} per label
// into a one-dimensional uint8 tensor of ceil(numel * bits / 8) bytes, in the format documented in
// qext/kernels/packed_labels.h (row-major order, label i in byte i / (8 / bits) at bit offset
// (i % (8 / bits)) * bits, padding bits zero).
at::Tensor pack_labels(const at::Tensor& labels, int64_t bits);

// The uint8 labels of `shape` packed by pack_labels; packed must be one-dimensional uint8 of
// exactly ceil(prod(shape) * bits / 8) bytes.
at::Tensor unpack_labels(const at::Tensor& packed, int64_t bits, at::IntArrayRef shape);

}  // namespace qext::ops
