// fake_quantize_observe: one C++ call per quantizer and training step instead of a handful of
// Python-level tensor ops. Composed of qext's own operators (CompositeImplicitAutograd), so every
// backend that has aminmax / choose_qparams / fake_quantize runs it, and autograd comes from
// fake_quantize.
#include "qext/ops/fake_quantize_observe.h"

#include <ATen/TensorOperators.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/isfinite.h>
#include <ATen/ops/maximum.h>
#include <ATen/ops/minimum.h>
#include <ATen/ops/where.h>
#include <c10/core/GradMode.h>
#include <torch/library.h>

#include "qext/ops/common/quant_params.h"
#include "qext/ops/fake_quantize.h"
#include "qext/ops/observe.h"

namespace qext::ops {

at::Tensor fake_quantize_observe(const at::Tensor& input, at::Tensor& running_min,
                                 at::Tensor& running_max, at::Tensor& scale, at::Tensor& zero_point,
                                 std::optional<double> averaging_constant, int64_t quant_min,
                                 int64_t quant_max, bool symmetric, std::optional<int64_t> axis,
                                 bool observe) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("qext::fake_quantize_observe", "")
                       .typed<decltype(fake_quantize_observe)>();
  return op.call(input, running_min, running_max, scale, zero_point, averaging_constant, quant_min,
                 quant_max, symmetric, axis, observe);
}

namespace {

constexpr const char* kOp = "fake_quantize_observe";

void check_state(const at::Tensor& t, const char* name, at::ScalarType dtype, int64_t numel,
                 const at::Tensor& input) {
  TORCH_CHECK(t.scalar_type() == dtype && t.numel() == numel && t.dim() <= 1, kOp, ": ", name,
              " must be a ", dtype, " tensor of ", numel, " element(s), got ", t.scalar_type(),
              " of shape ", t.sizes());
  TORCH_CHECK(t.device() == input.device(), kOp, ": ", name, " must be on the input's device ",
              input.device(), ", got ", t.device());
}

// Folds this batch's statistics into the running ones (in place).
void update_running_range(const at::Tensor& batch_min, const at::Tensor& batch_max,
                          at::Tensor& running_min, at::Tensor& running_max,
                          std::optional<double> averaging_constant) {
  if (!averaging_constant.has_value()) {
    running_min.copy_(at::minimum(running_min, batch_min));
    running_max.copy_(at::maximum(running_max, batch_max));
    return;
  }
  const double c = *averaging_constant;
  // A channel starts from its first finite batch; batches without finite values change nothing.
  const at::Tensor seen = at::isfinite(running_min);
  const at::Tensor has_data = at::isfinite(batch_min);
  const at::Tensor ema_min = running_min + (batch_min - running_min) * c;
  const at::Tensor ema_max = running_max + (batch_max - running_max) * c;
  running_min.copy_(at::where(has_data, at::where(seen, ema_min, batch_min), running_min));
  running_max.copy_(at::where(has_data, at::where(seen, ema_max, batch_max), running_max));
}

at::Tensor fake_quantize_observe_impl(const at::Tensor& input, at::Tensor& running_min,
                                      at::Tensor& running_max, at::Tensor& scale,
                                      at::Tensor& zero_point,
                                      std::optional<double> averaging_constant, int64_t quant_min,
                                      int64_t quant_max, bool symmetric,
                                      std::optional<int64_t> axis, bool observe) {
  detail::check_float_input(input, kOp);
  detail::check_quant_range(quant_min, quant_max, kOp);
  const std::optional<int64_t> normalised = detail::normalize_axis(input, axis, kOp);
  const int64_t channels = normalised.has_value() ? input.size(*normalised) : 1;
  check_state(running_min, "running_min", at::kFloat, channels, input);
  check_state(running_max, "running_max", at::kFloat, channels, input);
  check_state(scale, "scale", at::kFloat, channels, input);
  check_state(zero_point, "zero_point", at::kInt, channels, input);
  if (averaging_constant.has_value()) {
    TORCH_CHECK_VALUE(*averaging_constant > 0.0 && *averaging_constant <= 1.0, kOp,
                      ": averaging_constant must be in (0, 1], got ", *averaging_constant);
  }

  if (observe) {
    const at::NoGradGuard no_grad;
    const auto [batch_min, batch_max] = ops::aminmax(input.detach(), normalised);
    // Validate the new range before touching the caller's buffers: nothing changes on error.
    at::Tensor new_min = running_min.clone(), new_max = running_max.clone();
    update_running_range(batch_min.reshape(running_min.sizes()),
                         batch_max.reshape(running_max.sizes()), new_min, new_max,
                         averaging_constant);
    const auto [new_scale, new_zero_point] =
        ops::choose_qparams(new_min, new_max, quant_min, quant_max, symmetric);
    running_min.copy_(new_min);
    running_max.copy_(new_max);
    scale.copy_(new_scale);
    zero_point.copy_(new_zero_point);
  }
  return ops::fake_quantize(input, scale, zero_point, quant_min, quant_max,
                            channels > 1 ? normalised : std::nullopt);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(qext, m) {
  m.def(
      "fake_quantize_observe(Tensor input, Tensor(a!) running_min, Tensor(b!) running_max, "
      "Tensor(c!) scale, Tensor(d!) zero_point, float? averaging_constant, int quant_min, "
      "int quant_max, bool symmetric, int? axis=None, bool observe=True) -> Tensor");
}

TORCH_LIBRARY_IMPL(qext, CompositeImplicitAutograd, m) {
  m.impl("fake_quantize_observe", fake_quantize_observe_impl);
}

}  // namespace qext::ops
