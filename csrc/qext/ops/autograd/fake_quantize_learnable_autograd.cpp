// Autograd for fake_quantize_learnable (LSQ / LSQ+): one fused backward pass gives the gradients
// of input, scale and zero point.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include "qext/ops/fake_quantize_learnable.h"

namespace qext::ops {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::Variable;
using torch::autograd::variable_list;

std::tuple<at::Tensor, at::Tensor, at::Tensor> fake_quantize_learnable_backward(
    const at::Tensor& grad, const at::Tensor& input, const at::Tensor& scale,
    const at::Tensor& zero_point, int64_t quant_min, int64_t quant_max, double grad_factor,
    std::optional<int64_t> axis) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("qext::_fake_quantize_learnable_backward", "")
                       .typed<decltype(fake_quantize_learnable_backward)>();
  return op.call(grad, input, scale, zero_point, quant_min, quant_max, grad_factor, axis);
}

class FakeQuantizeLearnableFunction
    : public torch::autograd::Function<FakeQuantizeLearnableFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const Variable& input, const Variable& scale,
                               const Variable& zero_point, int64_t quant_min, int64_t quant_max,
                               double grad_factor, std::optional<int64_t> axis) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({input, scale, zero_point});
    ctx->saved_data["quant_min"] = quant_min;
    ctx->saved_data["quant_max"] = quant_max;
    ctx->saved_data["grad_factor"] = grad_factor;
    ctx->saved_data["axis"] = axis;
    return {
        fake_quantize_learnable(input, scale, zero_point, quant_min, quant_max, grad_factor, axis)};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    const auto axis = ctx->saved_data["axis"].toOptional<int64_t>();
    auto [dx, dscale, dzero_point] = fake_quantize_learnable_backward(
        grad_outputs[0], saved[0], saved[1], saved[2], ctx->saved_data["quant_min"].toInt(),
        ctx->saved_data["quant_max"].toInt(), ctx->saved_data["grad_factor"].toDouble(), axis);
    // An integer zero point (symmetric LSQ) is not trainable: it gets no gradient.
    if (!saved[2].requires_grad()) dzero_point = Variable();
    return {dx, dscale, dzero_point, Variable(), Variable(), Variable(), Variable()};
  }
};

at::Tensor fake_quantize_learnable_autograd(const at::Tensor& input, const at::Tensor& scale,
                                            const at::Tensor& zero_point, int64_t quant_min,
                                            int64_t quant_max, double grad_factor,
                                            std::optional<int64_t> axis) {
  const bool wants_grad =
      input.requires_grad() || scale.requires_grad() || zero_point.requires_grad();
  if (!(at::GradMode::is_enabled() && wants_grad)) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return fake_quantize_learnable(input, scale, zero_point, quant_min, quant_max, grad_factor,
                                   axis);
  }
  return FakeQuantizeLearnableFunction::apply(input, scale, zero_point, quant_min, quant_max,
                                              grad_factor, axis)[0];
}

}  // namespace

TORCH_LIBRARY_IMPL(qext, Autograd, m) {
  m.impl("fake_quantize_learnable", fake_quantize_learnable_autograd);
}

}  // namespace qext::ops
