#include "qext/ops/common/observe_args.h"

#include <c10/util/Exception.h>

#include <cmath>

#include "qext/ops/common/quant_params.h"

namespace qext::ops::detail {

std::optional<int64_t> check_aminmax_args(const at::Tensor& input, std::optional<int64_t> axis) {
  constexpr const char* op = "aminmax";
  check_float_input(input, op);
  const std::optional<int64_t> normalised = normalize_axis(input, axis, op);
  TORCH_CHECK_VALUE(input.numel() > 0, op, ": input is empty (shape ", input.sizes(),
                    "): there is nothing to observe");
  return normalised;
}

void check_histogram_args(const at::Tensor& input, int64_t bins, double min, double max) {
  constexpr const char* op = "histogram";
  check_float_input(input, op);
  TORCH_CHECK_VALUE(bins >= 1, op, ": bins must be at least 1, got ", bins);
  TORCH_CHECK_VALUE(std::isfinite(min) && std::isfinite(max) && min < max, op,
                    ": the range must be finite with min < max, got [", min, ", ", max, "]");
}

void check_choose_qparams_args(const at::Tensor& min_val, const at::Tensor& max_val,
                               int64_t quant_min, int64_t quant_max, double eps) {
  constexpr const char* op = "choose_qparams";
  check_quant_range(quant_min, quant_max, op);
  check_float_input(min_val, op, "min_val");
  check_float_input(max_val, op, "max_val");
  TORCH_CHECK_VALUE(min_val.sizes() == max_val.sizes(), op,
                    ": min_val and max_val must have the same shape, got ", min_val.sizes(),
                    " and ", max_val.sizes());
  TORCH_CHECK(min_val.device() == max_val.device(), op,
              ": min_val and max_val must be on the same device, got ", min_val.device(), " and ",
              max_val.device());
  TORCH_CHECK_VALUE(std::isfinite(eps) && eps > 0.0, op, ": eps must be finite and positive, got ",
                    eps);
}

}  // namespace qext::ops::detail
