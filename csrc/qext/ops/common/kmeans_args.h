// Argument checks and host steps shared by the CPU and CUDA kernels of qext::kmeans
// (ops/kmeans.h): the same checks in the same order with the same messages, made before anything
// is written, and the same host clustering, so that both devices return the same bits.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include <cstdint>
#include <optional>

#include "qext/kernels/kmeans1d.h"

namespace qext::ops::detail {

struct KMeansArgs {
  int64_t k = 0;
  std::optional<int64_t> axis;  // normalised; empty: one codebook
  kernels::KMeansInit init = kernels::KMeansInit::kLinear;
  int64_t max_iters = 0;
  uint64_t seed = 0;
  int64_t rows = 1;      // codebooks
  int64_t row_size = 0;  // values per codebook
};

// weight floating and non-empty, axis in range, k in [1, 256] and <= the values per codebook,
// init one of "linear", "density", "kmeans++", max_iters >= 0. Reads no values.
KMeansArgs check_kmeans_args(const at::Tensor& weight, int64_t k, std::optional<int64_t> axis,
                             c10::string_view init, int64_t max_iters, int64_t seed);

// weight's values as a contiguous [rows, row_size] tensor on weight's device, row r holding the
// values of codebook r, in the dtype the clustering runs in: float64 for float64 weights, float32
// otherwise (float16 and bfloat16 convert exactly).
at::Tensor kmeans_rows(const at::Tensor& weight, const KMeansArgs& args);

struct Codebooks {
  at::Tensor centroids;  // weight's dtype, [k] or [C, k], on the host
  at::Tensor trees;      // rows' dtype, [rows, search_tree_size(k)]: label search trees of the
                         // returned (rounded) centroids, on the host
};

// Clusters each row of the host tensor `rows` (in parallel over rows; each row alone, so the
// result does not depend on the thread count). The ValueError for a non-finite value names it.
Codebooks cluster_rows(const at::Tensor& rows, const KMeansArgs& args, at::ScalarType out_dtype);

// The [rows, row_size] labels in weight's shape, contiguous.
at::Tensor labels_like(const at::Tensor& row_labels, const at::Tensor& weight,
                       const KMeansArgs& args);

}  // namespace qext::ops::detail
