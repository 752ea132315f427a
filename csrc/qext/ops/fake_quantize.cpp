// Schemas of the straight-through fake-quantization ops and their public C++ API.
#include "qext/ops/fake_quantize.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/scalar_tensor.h>
#include <torch/library.h>

namespace qext::ops {

at::Tensor fake_quantize(const at::Tensor& input, const at::Tensor& scale,
                         const at::Tensor& zero_point, int64_t quant_min, int64_t quant_max,
                         std::optional<int64_t> axis) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("qext::fake_quantize", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         int64_t, int64_t, std::optional<int64_t>)>();
  return op.call(input, scale, zero_point, quant_min, quant_max, axis);
}

at::Tensor fake_quantize(const at::Tensor& input, double scale, int64_t zero_point,
                         int64_t quant_min, int64_t quant_max) {
  const auto options = at::TensorOptions().device(input.device());
  return fake_quantize(input, at::scalar_tensor(scale, options.dtype(at::kFloat)),
                       at::scalar_tensor(zero_point, options.dtype(at::kInt)), quant_min, quant_max,
                       std::nullopt);
}

TORCH_LIBRARY_FRAGMENT(qext, m) {
  m.def(
      "fake_quantize(Tensor input, Tensor scale, Tensor zero_point, int quant_min, int quant_max, "
      "int? axis=None) -> Tensor");
  // Forward that also returns the bit-packed in-range mask the backward needs.
  m.def(
      "_fake_quantize_with_mask(Tensor input, Tensor scale, Tensor zero_point, int quant_min, "
      "int quant_max, int? axis=None) -> (Tensor, Tensor)");
  // grad_input = grad where the mask bit is set, else 0; grad has the layout of the forward output.
  m.def("_fake_quantize_mask_backward(Tensor grad, Tensor mask) -> Tensor");
}

}  // namespace qext::ops
