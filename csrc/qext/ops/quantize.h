// Float <-> integer conversion with the same numerics as fake_quantize:
// dequantize(quantize(x)) == fake_quantize(x) element for element.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>

namespace qext::ops {

// q = clamp(nearbyint(x / scale) + zero_point, quant_min, quant_max), stored as `dtype` (int8,
// uint8 or int32; by default the smallest of uint8, int8, int32 that holds the range).
at::Tensor quantize(const at::Tensor& input, const at::Tensor& scale, const at::Tensor& zero_point,
                    int64_t quant_min, int64_t quant_max,
                    std::optional<int64_t> axis = std::nullopt,
                    std::optional<at::ScalarType> dtype = std::nullopt);

// x = (q - zero_point) * scale as `dtype` (float32 by default), q an int8, uint8 or int32 tensor.
at::Tensor dequantize(const at::Tensor& input, const at::Tensor& scale,
                      const at::Tensor& zero_point, std::optional<int64_t> axis = std::nullopt,
                      std::optional<at::ScalarType> dtype = std::nullopt);

}  // namespace qext::ops
