// Meta (shape-only) kernels: output shapes and dtypes for fake tensors and torch.compile. They
// check everything that does not need the values of scale and zero_point.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <tuple>

#include "qext/ops/common/quant_params.h"

namespace qext::ops {
namespace {

using detail::ZeroPointKind;

at::Tensor fake_quantize_meta(const at::Tensor& input, const at::Tensor& scale,
                              const at::Tensor& zero_point, int64_t quant_min, int64_t quant_max,
                              std::optional<int64_t> axis) {
  detail::check_quant_signature(input, scale, zero_point, quant_min, quant_max, axis,
                                ZeroPointKind::kInteger, "fake_quantize");
  return at::empty_like(detail::as_dense(input));
}

std::tuple<at::Tensor, at::Tensor> fake_quantize_with_mask_meta(
    const at::Tensor& input, const at::Tensor& scale, const at::Tensor& zero_point,
    int64_t quant_min, int64_t quant_max, std::optional<int64_t> axis) {
  at::Tensor y = fake_quantize_meta(input, scale, zero_point, quant_min, quant_max, axis);
  return {y,
          at::empty({detail::packed_mask_bytes(input.numel())}, input.options().dtype(at::kByte))};
}

at::Tensor fake_quantize_mask_backward_meta(const at::Tensor& grad, const at::Tensor& mask) {
  return at::empty_like(grad);
}

at::Tensor fake_quantize_learnable_meta(const at::Tensor& input, const at::Tensor& scale,
                                        const at::Tensor& zero_point, int64_t quant_min,
                                        int64_t quant_max, double grad_factor,
                                        std::optional<int64_t> axis) {
  detail::check_quant_signature(input, scale, zero_point, quant_min, quant_max, axis,
                                ZeroPointKind::kLearnable, "fake_quantize_learnable");
  return at::empty_like(detail::as_dense(input));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fake_quantize_learnable_backward_meta(
    const at::Tensor& grad, const at::Tensor& input, const at::Tensor& scale,
    const at::Tensor& zero_point, int64_t quant_min, int64_t quant_max, double grad_factor,
    std::optional<int64_t> axis) {
  const auto zp_dtype = detail::zero_point_grad_dtype(zero_point, scale);
  return {at::empty_like(detail::as_dense(input)), at::empty_like(scale),
          at::empty_like(zero_point, zero_point.options().dtype(zp_dtype))};
}

at::Tensor quantize_meta(const at::Tensor& input, const at::Tensor& scale,
                         const at::Tensor& zero_point, int64_t quant_min, int64_t quant_max,
                         std::optional<int64_t> axis, std::optional<at::ScalarType> dtype) {
  detail::check_quant_signature(input, scale, zero_point, quant_min, quant_max, axis,
                                ZeroPointKind::kInteger, "quantize");
  const auto out_type = detail::quantized_storage_type(quant_min, quant_max, dtype, "quantize");
  return at::empty_like(detail::as_dense(input), input.options().dtype(out_type));
}

at::Tensor dequantize_meta(const at::Tensor& input, const at::Tensor& scale,
                           const at::Tensor& zero_point, std::optional<int64_t> axis,
                           std::optional<at::ScalarType> dtype) {
  const auto [lo, hi] = detail::storage_range(input.scalar_type(), "dequantize");
  detail::check_quant_signature(input, scale, zero_point, lo, hi, axis, ZeroPointKind::kStorage,
                                "dequantize");
  return at::empty_like(detail::as_dense(input), input.options().dtype(dtype.value_or(at::kFloat)));
}

}  // namespace

TORCH_LIBRARY_IMPL(qext, Meta, m) {
  m.impl("fake_quantize", fake_quantize_meta);
  m.impl("_fake_quantize_with_mask", fake_quantize_with_mask_meta);
  m.impl("_fake_quantize_mask_backward", fake_quantize_mask_backward_meta);
  m.impl("fake_quantize_learnable", fake_quantize_learnable_meta);
  m.impl("_fake_quantize_learnable_backward", fake_quantize_learnable_backward_meta);
  m.impl("quantize", quantize_meta);
  m.impl("dequantize", dequantize_meta);
}

}  // namespace qext::ops
