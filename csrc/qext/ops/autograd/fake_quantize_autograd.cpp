// Autograd for fake_quantize: the clipped straight-through estimator. The forward saves a
// bit-packed in-range mask (1 bit per element) instead of the input.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include "qext/ops/common/quant_params.h"
#include "qext/ops/fake_quantize.h"

namespace qext::ops {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::Variable;
using torch::autograd::variable_list;

std::tuple<at::Tensor, at::Tensor> fake_quantize_with_mask(const at::Tensor& input,
                                                           const at::Tensor& scale,
                                                           const at::Tensor& zero_point,
                                                           int64_t quant_min, int64_t quant_max,
                                                           std::optional<int64_t> axis) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("qext::_fake_quantize_with_mask", "")
                       .typed<decltype(fake_quantize_with_mask)>();
  return op.call(input, scale, zero_point, quant_min, quant_max, axis);
}

at::Tensor fake_quantize_mask_backward(const at::Tensor& grad, const at::Tensor& mask) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("qext::_fake_quantize_mask_backward", "")
                       .typed<decltype(fake_quantize_mask_backward)>();
  return op.call(grad, mask);
}

class FakeQuantizeFunction : public torch::autograd::Function<FakeQuantizeFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const Variable& input, const Variable& scale,
                               const Variable& zero_point, int64_t quant_min, int64_t quant_max,
                               std::optional<int64_t> axis) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [output, mask] =
        fake_quantize_with_mask(input, scale, zero_point, quant_min, quant_max, axis);
    ctx->save_for_backward({mask});
    // The mask follows the output's memory order; the backward brings grad to the same layout.
    ctx->saved_data["sizes"] = output.sizes().vec();
    ctx->saved_data["strides"] = output.strides().vec();
    return {output};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const at::Tensor mask = ctx->get_saved_variables()[0];
    const auto sizes = ctx->saved_data["sizes"].toIntVector();
    const auto strides = ctx->saved_data["strides"].toIntVector();
    const at::Tensor grad = detail::align_to_layout(grad_outputs[0], sizes, strides);
    return {fake_quantize_mask_backward(grad, mask),
            Variable(),
            Variable(),
            Variable(),
            Variable(),
            Variable()};
  }
};

at::Tensor fake_quantize_autograd(const at::Tensor& input, const at::Tensor& scale,
                                  const at::Tensor& zero_point, int64_t quant_min,
                                  int64_t quant_max, std::optional<int64_t> axis) {
  if (!(at::GradMode::is_enabled() && input.requires_grad())) {
    // No gradient wanted: skip the mask.
    at::AutoDispatchBelowADInplaceOrView guard;
    return fake_quantize(input, scale, zero_point, quant_min, quant_max, axis);
  }
  return FakeQuantizeFunction::apply(input, scale, zero_point, quant_min, quant_max, axis)[0];
}

}  // namespace

TORCH_LIBRARY_IMPL(qext, Autograd, m) { m.impl("fake_quantize", fake_quantize_autograd); }

}  // namespace qext::ops
