// 1-D k-means clustering of weights: the codebooks of weight sharing (Deep Compression).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include <cstdint>
#include <optional>
#include <tuple>

namespace qext::ops {

// Exact 1-D k-means (Lloyd's algorithm) of the values of weight: one codebook of k centroids for
// the whole tensor (axis empty: centroids [k]) or one per index along `axis` (centroids [C, k],
// C = weight.size(axis), negative axis counts from the end).
// weight: float32, float64, float16 or bfloat16, any shape, non-empty, all finite; k in [1, 256]
// and at most the number of values clustered together. init: "linear" (evenly spaced from the
// minimum to the maximum), "density" (the values of rank floor((2j + 1) n / 2k), evenly spaced
// quantiles) or "kmeans++" (D^2 sampling, seeded by `seed`, on the 4096 quantiles of rank
// floor((2i + 1) n / 8192), or all values when fewer). Then Lloyd iterations until no centroid
// changes or max_iters (>= 0); a cluster without values keeps its centroid.
// Returns centroids in weight's dtype, each row ascending, and uint8 labels of weight's shape
// (contiguous): the index of the nearest returned centroid, ties to the lower index. The result
// depends only on the values (not on their order, the thread count or the device): CPU and CUDA
// give the same bits.
std::tuple<at::Tensor, at::Tensor> kmeans(const at::Tensor& weight, int64_t k,
                                          std::optional<int64_t> axis = std::nullopt,
                                          c10::string_view init = "linear", int64_t max_iters = 30,
                                          int64_t seed = 0);

}  // namespace qext::ops
