// Look-up-table inference for converted k-means layers: a weight stored as packed labels (2/4/8 or
// 1 bits each, format in qext/kernels/kmeans_lut.h) plus a float32 codebook, decoded on the fly.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>

namespace qext::ops {

// y = input @ W^T (+ bias) for input float32 [..., K] -> float32 [..., N], where the weight of
// weight_shape [N, K] is W[n][k] = centroids[label(n, k)] (centroids [k]) or
// centroids[n][label(n, k)] (centroids [N, k]), its labels read from packed_labels (uint8,
// ceil(N * K * bits / 8) bytes). W is never materialised; the sums follow the fixed order of
// kernels/kmeans_lut.h, so y is bit-identical to kmeans_linear_reference(input,
// kmeans_decode(...), bias) on every device and thread count, and agrees with
// torch.nn.functional.linear on the decoded weight to float rounding. A label >= k is an
// IndexError.
at::Tensor kmeans_linear(const at::Tensor& input, const at::Tensor& packed_labels,
                         const at::Tensor& centroids, int64_t bits, at::IntArrayRef weight_shape,
                         const std::optional<at::Tensor>& bias = std::nullopt);

// The dense float32 weight of weight_shape (any rank, e.g. a Conv2d's [OC, C / groups, kh, kw])
// that the packed labels and codebook describe; a per-channel codebook is [weight_shape[0], k].
at::Tensor kmeans_decode(const at::Tensor& packed_labels, const at::Tensor& centroids, int64_t bits,
                         at::IntArrayRef weight_shape);

// The scalar reference of kmeans_linear's order on a dense float32 weight [N, K] (CPU only; the
// operator qext::_kmeans_linear_reference), for tests.
at::Tensor kmeans_linear_reference(const at::Tensor& input, const at::Tensor& weight,
                                   const std::optional<at::Tensor>& bias = std::nullopt);

}  // namespace qext::ops
