// Fake quantization with learnable step size (LSQ, Esser et al. 2020) and learnable zero point
// (LSQ+, Bhalgat et al. 2020).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>

namespace qext::ops {

// Forward as fake_quantize, with zero_point a real tensor rounded half-to-even and clamped to
// [quant_min, quant_max]. Gradients match
// torch._fake_quantize_learnable_per_{tensor,channel}_affine:
//   dx = dy inside the range, 0 outside;
//   dscale = grad_factor * sum(dy * ((x_fq - x) / scale) inside, dy * (q_bound - zero_point)
//   outside); dzero_point = grad_factor * sum(-dy * scale outside).
// Sums run over the tensor (per-tensor) or over everything but `axis` (per-channel), in one pass.
at::Tensor fake_quantize_learnable(const at::Tensor& input, const at::Tensor& scale,
                                   const at::Tensor& zero_point, int64_t quant_min,
                                   int64_t quant_max, double grad_factor = 1.0,
                                   std::optional<int64_t> axis = std::nullopt);

}  // namespace qext::ops
