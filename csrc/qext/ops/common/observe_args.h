// Argument checks of the observer statistics ops, shared by their CPU, CUDA and Meta kernels.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>

namespace qext::ops::detail {

// input is a floating tensor with at least one element (per channel); returns the normalised axis.
std::optional<int64_t> check_aminmax_args(const at::Tensor& input, std::optional<int64_t> axis);

// input floating, bins >= 1, min < max both finite.
void check_histogram_args(const at::Tensor& input, int64_t bins, double min, double max);

void check_choose_qparams_args(const at::Tensor& min_val, const at::Tensor& max_val,
                               int64_t quant_min, int64_t quant_max, double eps);

}  // namespace qext::ops::detail
