// Argument checks of the look-up-table ops (ops/kmeans_lut.h), shared by their CPU, CUDA and Meta
// kernels: every bad argument gets the same message on any device, before any output exists.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <vector>

#include "qext/kernels/kmeans_lut.h"

namespace qext::ops::detail {

// A checked weight given as packed labels and a codebook: rows = weight_shape[0] (the output
// channels), cols = the product of the other sizes.
struct LutWeightArgs {
  int bits = 0;
  int64_t rows = 0, cols = 0, k = 0;
  bool per_channel = false;
  at::Tensor labels, centroids;  // contiguous

  int64_t numel() const { return rows * cols; }
  // Labels can reach k (and need the range pass) only when the codebook is not full.
  bool labels_can_exceed_k() const { return k < (int64_t{1} << bits); }
  kernels::LutWeight view() const;  // pointers into labels / centroids
};

// bits in {1, 2, 4, 8}; weight_shape of positive sizes (exactly `dims` of them, or at least one
// when dims == 0); packed_labels 1-D uint8 of ceil(numel * bits / 8) bytes; centroids float32 [k]
// or [weight_shape[0], k] with 1 <= k <= 2^bits, on packed_labels' device.
LutWeightArgs check_lut_weight(const at::Tensor& packed_labels, const at::Tensor& centroids,
                               int64_t bits, at::IntArrayRef weight_shape, int64_t dims,
                               const char* op);

// input float32 [..., K] and bias float32 [N] (optional) on `device`; returns the output sizes
// [..., N].
std::vector<int64_t> check_linear_input(const at::Tensor& input,
                                        const std::optional<at::Tensor>& bias, int64_t N, int64_t K,
                                        at::Device device, const char* op);

// The checked arguments of one kmeans_linear call (all but the label values).
struct LutLinearCall {
  LutWeightArgs w;
  at::Tensor x, bias;  // contiguous; bias undefined when there is none
  std::vector<int64_t> out_sizes;
  int64_t rows = 0;  // M: the rows of x
};
LutLinearCall check_lut_linear(const at::Tensor& input, const at::Tensor& packed_labels,
                               const at::Tensor& centroids, int64_t bits,
                               at::IntArrayRef weight_shape, const std::optional<at::Tensor>& bias,
                               const char* op);

// Throws the IndexError for the first label >= k of cpu_labels (the packed labels of w, on the
// CPU); call it once a range pass found one.
[[noreturn]] void throw_label_out_of_range(const at::Tensor& cpu_labels, const LutWeightArgs& w,
                                           const char* op);

}  // namespace qext::ops::detail
