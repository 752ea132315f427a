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

// quantize with a per-tensor scale and zero point, returned as a PyTorch quantized tensor (quint8,
// qint8 or qint32: the first that holds [quant_min, quant_max]) with scale float32(scale). The
// layout is input's when channels-last, else contiguous. CPU.
at::Tensor quantize_per_tensor(const at::Tensor& input, double scale, int64_t zero_point,
                               int64_t quant_min, int64_t quant_max);

// dequantize of a per-tensor quantized tensor's levels with its q_scale (as float32) and
// q_zero_point: float32, input's layout when channels-last, else contiguous. CPU.
at::Tensor dequantize_per_tensor(const at::Tensor& input);

}  // namespace qext::ops
