// Schemas of quantize / dequantize and their public C++ API.
#include "qext/ops/quantize.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

namespace qext::ops {

at::Tensor quantize(const at::Tensor& input, const at::Tensor& scale, const at::Tensor& zero_point,
                    int64_t quant_min, int64_t quant_max, std::optional<int64_t> axis,
                    std::optional<at::ScalarType> dtype) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("qext::quantize", "")
                       .typed<decltype(quantize)>();
  return op.call(input, scale, zero_point, quant_min, quant_max, axis, dtype);
}

at::Tensor dequantize(const at::Tensor& input, const at::Tensor& scale,
                      const at::Tensor& zero_point, std::optional<int64_t> axis,
                      std::optional<at::ScalarType> dtype) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("qext::dequantize", "")
                       .typed<decltype(dequantize)>();
  return op.call(input, scale, zero_point, axis, dtype);
}

at::Tensor quantize_per_tensor(const at::Tensor& input, double scale, int64_t zero_point,
                               int64_t quant_min, int64_t quant_max) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("qext::quantize_per_tensor", "")
                       .typed<decltype(quantize_per_tensor)>();
  return op.call(input, scale, zero_point, quant_min, quant_max);
}

at::Tensor dequantize_per_tensor(const at::Tensor& input) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("qext::dequantize_per_tensor", "")
                       .typed<decltype(dequantize_per_tensor)>();
  return op.call(input);
}

TORCH_LIBRARY_FRAGMENT(qext, m) {
  m.def(
      "quantize(Tensor input, Tensor scale, Tensor zero_point, int quant_min, int quant_max, "
      "int? axis=None, ScalarType? dtype=None) -> Tensor");
  m.def(
      "dequantize(Tensor input, Tensor scale, Tensor zero_point, int? axis=None, "
      "ScalarType? dtype=None) -> Tensor");
  m.def(
      "quantize_per_tensor(Tensor input, float scale, int zero_point, int quant_min, "
      "int quant_max) -> Tensor");
  m.def("dequantize_per_tensor(Tensor input) -> Tensor");
}

}  // namespace qext::ops
