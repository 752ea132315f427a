// Meta (shape-only) kernels of the observer statistics ops.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <tuple>

#include "qext/ops/common/observe_args.h"

namespace qext::ops {
namespace {

std::tuple<at::Tensor, at::Tensor> aminmax_meta(const at::Tensor& input,
                                                std::optional<int64_t> axis) {
  const auto normalised = detail::check_aminmax_args(input, axis);
  const int64_t channels = normalised.has_value() ? input.size(*normalised) : 1;
  const auto options = input.options().dtype(at::kFloat);
  return {at::empty({channels}, options), at::empty({channels}, options)};
}

at::Tensor histogram_meta(const at::Tensor& input, int64_t bins, double min, double max) {
  detail::check_histogram_args(input, bins, min, max);
  return at::empty({bins}, input.options().dtype(at::kLong));
}

std::tuple<at::Tensor, at::Tensor> choose_qparams_meta(const at::Tensor& min_val,
                                                       const at::Tensor& max_val, int64_t quant_min,
                                                       int64_t quant_max, bool symmetric,
                                                       double eps) {
  detail::check_choose_qparams_args(min_val, max_val, quant_min, quant_max, eps);
  return {at::empty_like(min_val, min_val.options().dtype(at::kFloat)),
          at::empty_like(min_val, min_val.options().dtype(at::kInt))};
}

}  // namespace

TORCH_LIBRARY_IMPL(qext, Meta, m) {
  m.impl("aminmax", aminmax_meta);
  m.impl("histogram", histogram_meta);
  m.impl("choose_qparams", choose_qparams_meta);
}

}  // namespace qext::ops
