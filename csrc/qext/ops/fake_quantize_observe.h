// Observe-and-fake-quantize in one call: the training step of an activation or weight quantizer.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>

namespace qext::ops {

// When `observe`: folds the finite min/max of input (per-tensor, or per channel along `axis`) into
// running_min / running_max in place (running min/max when averaging_constant is empty, else an
// exponential moving average that starts from the first batch; channels without finite values
// in this batch keep their statistics), then writes the resulting scale / zero_point (in place,
// choose_qparams). Always returns fake_quantize(input, scale, zero_point, ...), with its
// straight-through gradient. running_min/max and scale are float32, zero_point int32, all with one
// element (per-tensor) or one per channel; a fresh observer holds running_min = +inf, max = -inf.
at::Tensor fake_quantize_observe(const at::Tensor& input, at::Tensor& running_min,
                                 at::Tensor& running_max, at::Tensor& scale, at::Tensor& zero_point,
                                 std::optional<double> averaging_constant, int64_t quant_min,
                                 int64_t quant_max, bool symmetric, std::optional<int64_t> axis,
                                 bool observe);

}  // namespace qext::ops
