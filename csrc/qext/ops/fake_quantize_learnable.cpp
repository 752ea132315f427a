// Schemas of the learnable (LSQ / LSQ+) fake-quantization ops and their public C++ API.
#include "qext/ops/fake_quantize_learnable.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

namespace qext::ops {

at::Tensor fake_quantize_learnable(const at::Tensor& input, const at::Tensor& scale,
                                   const at::Tensor& zero_point, int64_t quant_min,
                                   int64_t quant_max, double grad_factor,
                                   std::optional<int64_t> axis) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("qext::fake_quantize_learnable", "")
                       .typed<decltype(fake_quantize_learnable)>();
  return op.call(input, scale, zero_point, quant_min, quant_max, grad_factor, axis);
}

TORCH_LIBRARY_FRAGMENT(qext, m) {
  m.def(
      "fake_quantize_learnable(Tensor input, Tensor scale, Tensor zero_point, int quant_min, "
      "int quant_max, float grad_factor=1.0, int? axis=None) -> Tensor");
  // One fused pass: (grad_input, grad_scale, grad_zero_point); grad has the layout of input.
  m.def(
      "_fake_quantize_learnable_backward(Tensor grad, Tensor input, Tensor scale, "
      "Tensor zero_point, int quant_min, int quant_max, float grad_factor, int? axis) "
      "-> (Tensor, Tensor, Tensor)");
}

}  // namespace qext::ops
