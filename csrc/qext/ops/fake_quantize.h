// Fake quantization with the clipped straight-through estimator.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>

namespace qext::ops {

// y = (clamp(nearbyint(x / scale) + zero_point, quant_min, quant_max) - zero_point) * scale,
// bit-identical to torch.fake_quantize_per_{tensor,channel}_affine for finite x.
// Per-tensor when scale has one element, per-channel along `axis` otherwise. scale: floating
// tensor; zero_point: integer tensor of the same shape, inside [quant_min, quant_max].
// Gradient: dy where x quantized inside the range, 0 elsewhere (saves a bit-packed mask).
at::Tensor fake_quantize(const at::Tensor& input, const at::Tensor& scale,
                         const at::Tensor& zero_point, int64_t quant_min, int64_t quant_max,
                         std::optional<int64_t> axis = std::nullopt);

// Per-tensor convenience overload.
at::Tensor fake_quantize(const at::Tensor& input, double scale, int64_t zero_point,
                         int64_t quant_min, int64_t quant_max);

}  // namespace qext::ops
