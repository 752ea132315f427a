// Schemas of the integer-only layer ops and their public C++ API.
#include "qext/ops/quantized_layers.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include "qext/kernels/qgemm.h"
#include "qext/ops/common/int8_args.h"
#include "qext/ops/cpu/derived_weights.h"

namespace qext::ops {
namespace {

template <typename Fn>
auto typed_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Fn>();
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> pack_quantized_weight(const at::Tensor& weight, int64_t groups) {
  static auto op = typed_op<decltype(pack_quantized_weight)>("qext::pack_quantized_weight");
  return op.call(weight, groups);
}

at::Tensor quantized_linear(const at::Tensor& input, const at::Tensor& packed_weight,
                            const at::Tensor& row_sums, at::IntArrayRef weight_shape,
                            const at::Tensor& weight_scale, const std::optional<at::Tensor>& bias,
                            std::optional<double> output_scale, int64_t output_zero_point,
                            int64_t output_min, int64_t output_max, bool relu) {
  static auto op = typed_op<decltype(quantized_linear)>("qext::quantized_linear");
  return op.call(input, packed_weight, row_sums, weight_shape, weight_scale, bias, output_scale,
                 output_zero_point, output_min, output_max, relu);
}

at::Tensor quantized_conv2d(const at::Tensor& input, const at::Tensor& packed_weight,
                            const at::Tensor& row_sums, at::IntArrayRef weight_shape,
                            const at::Tensor& weight_scale, const std::optional<at::Tensor>& bias,
                            at::IntArrayRef stride, at::IntArrayRef padding,
                            at::IntArrayRef dilation, int64_t groups,
                            std::optional<double> output_scale, int64_t output_zero_point,
                            int64_t output_min, int64_t output_max, bool relu) {
  static auto op = typed_op<decltype(quantized_conv2d)>("qext::quantized_conv2d");
  return op.call(input, packed_weight, row_sums, weight_shape, weight_scale, bias, stride, padding,
                 dilation, groups, output_scale, output_zero_point, output_min, output_max, relu);
}

at::Tensor quantized_add(const at::Tensor& a, const at::Tensor& b, double output_scale,
                         int64_t output_zero_point, int64_t output_min, int64_t output_max,
                         bool relu) {
  static auto op = typed_op<decltype(quantized_add)>("qext::quantized_add");
  return op.call(a, b, output_scale, output_zero_point, output_min, output_max, relu);
}

at::Tensor quantized_avg_pool2d(const at::Tensor& input, at::IntArrayRef kernel_size,
                                at::IntArrayRef stride, at::IntArrayRef padding, bool ceil_mode,
                                bool count_include_pad, std::optional<int64_t> divisor_override,
                                double output_scale, int64_t output_zero_point, int64_t output_min,
                                int64_t output_max) {
  static auto op = typed_op<decltype(quantized_avg_pool2d)>("qext::quantized_avg_pool2d");
  return op.call(input, kernel_size, stride, padding, ceil_mode, count_include_pad,
                 divisor_override, output_scale, output_zero_point, output_min, output_max);
}

at::Tensor quantized_adaptive_avg_pool2d(const at::Tensor& input, at::IntArrayRef output_size,
                                         double output_scale, int64_t output_zero_point,
                                         int64_t output_min, int64_t output_max) {
  static auto op =
      typed_op<decltype(quantized_adaptive_avg_pool2d)>("qext::quantized_adaptive_avg_pool2d");
  return op.call(input, output_size, output_scale, output_zero_point, output_min, output_max);
}

at::Tensor quantized_max_pool2d(const at::Tensor& input, at::IntArrayRef kernel_size,
                                at::IntArrayRef stride, at::IntArrayRef padding,
                                at::IntArrayRef dilation, bool ceil_mode) {
  static auto op = typed_op<decltype(quantized_max_pool2d)>("qext::quantized_max_pool2d");
  return op.call(input, kernel_size, stride, padding, dilation, ceil_mode);
}

at::Tensor quantized_flatten(const at::Tensor& input, int64_t start_dim, int64_t end_dim) {
  static auto op = typed_op<decltype(quantized_flatten)>("qext::quantized_flatten");
  return op.call(input, start_dim, end_dim);
}

void set_int8_isa(const std::string& name) { detail::set_int8_isa(name); }

std::string int8_isa() { return detail::int8_isa_name(); }

std::vector<std::string> supported_int8_isas() {
  std::vector<std::string> names;
  for (const auto isa : detail::all_int8_isas()) {
    if (kernels::isa_supported(isa)) names.emplace_back(kernels::isa_name(isa));
  }
  return names;
}

int64_t derived_weight_entries() { return detail::derived_weight_entries(); }

TORCH_LIBRARY_FRAGMENT(qext, m) {
  m.def("pack_quantized_weight(Tensor weight, int groups=1) -> (Tensor, Tensor)");
  m.def(
      "quantized_linear(Tensor input, Tensor packed_weight, Tensor row_sums, int[] weight_shape, "
      "Tensor weight_scale, Tensor? bias, float? output_scale, int output_zero_point, int "
      "output_min, int output_max, "
      "bool relu=False) -> Tensor");
  m.def(
      "quantized_conv2d(Tensor input, Tensor packed_weight, Tensor row_sums, int[] weight_shape, "
      "Tensor weight_scale, Tensor? bias, int[2] stride, int[2] padding, int[2] dilation, "
      "int groups, float? output_scale, int output_zero_point, int output_min, int output_max, "
      "bool relu=False) -> Tensor");
  m.def(
      "quantized_add(Tensor a, Tensor b, float output_scale, int output_zero_point, "
      "int output_min, int output_max, bool relu=False) -> Tensor");
  m.def(
      "quantized_avg_pool2d(Tensor input, int[2] kernel_size, int[2] stride, int[2] padding, "
      "bool ceil_mode, bool count_include_pad, int? divisor_override, float output_scale, "
      "int output_zero_point, int output_min, int output_max) -> Tensor");
  m.def(
      "quantized_adaptive_avg_pool2d(Tensor input, int[2] output_size, float output_scale, "
      "int output_zero_point, int output_min, int output_max) -> Tensor");
  m.def(
      "quantized_max_pool2d(Tensor input, int[2] kernel_size, int[2] stride, int[2] padding, "
      "int[2] dilation, bool ceil_mode) -> Tensor");
  m.def("quantized_flatten(Tensor input, int start_dim=0, int end_dim=-1) -> Tensor");
}

}  // namespace qext::ops
