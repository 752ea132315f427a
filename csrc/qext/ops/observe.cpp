// Schemas of the observer statistics ops and their public C++ API. choose_qparams works on a
// handful of values per call, so it has one device-independent implementation here (computed on
// the host); aminmax and histogram have CPU and CUDA kernels.
#include "qext/ops/observe.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cmath>
#include <string>

#include "qext/kernels/observe_ref.h"
#include "qext/ops/common/observe_args.h"

namespace qext::ops {

std::tuple<at::Tensor, at::Tensor> aminmax(const at::Tensor& input, std::optional<int64_t> axis) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("qext::aminmax", "")
                       .typed<decltype(aminmax)>();
  return op.call(input, axis);
}

at::Tensor histogram(const at::Tensor& input, int64_t bins, double min, double max) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("qext::histogram", "")
                       .typed<decltype(histogram)>();
  return op.call(input, bins, min, max);
}

std::tuple<at::Tensor, at::Tensor> choose_qparams(const at::Tensor& min_val,
                                                  const at::Tensor& max_val, int64_t quant_min,
                                                  int64_t quant_max, bool symmetric, double eps) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("qext::choose_qparams", "")
                       .typed<decltype(choose_qparams)>();
  return op.call(min_val, max_val, quant_min, quant_max, symmetric, eps);
}

namespace {

constexpr const char* kChooseQParams = "choose_qparams";

// Device-independent: the handful of values is computed on the host.
std::tuple<at::Tensor, at::Tensor> choose_qparams_impl(const at::Tensor& min_val,
                                                       const at::Tensor& max_val, int64_t quant_min,
                                                       int64_t quant_max, bool symmetric,
                                                       double eps) {
  detail::check_choose_qparams_args(min_val, max_val, quant_min, quant_max, eps);
  const at::Tensor lo = min_val.to(at::kCPU, at::kFloat).contiguous();
  const at::Tensor hi = max_val.to(at::kCPU, at::kFloat).contiguous();
  at::Tensor scale = at::empty(lo.sizes(), lo.options());
  at::Tensor zero_point = at::empty(lo.sizes(), lo.options().dtype(at::kInt));
  const float* lo_data = lo.const_data_ptr<float>();
  const float* hi_data = hi.const_data_ptr<float>();
  const int64_t n = lo.numel();
  for (int64_t c = 0; c < n; ++c) {
    const std::string where = n > 1 ? " for channel " + std::to_string(c) : "";
    TORCH_CHECK_VALUE(std::isfinite(lo_data[c]) && std::isfinite(hi_data[c]), kChooseQParams,
                      ": the observed range must be finite, got [", lo_data[c], ", ", hi_data[c],
                      "]", where, " (no finite values observed?)");
    TORCH_CHECK_VALUE(lo_data[c] <= hi_data[c], kChooseQParams, ": min_val ", lo_data[c],
                      " is greater than max_val ", hi_data[c], where);
    const kernels::QParams q = kernels::choose_qparams_ref(
        lo_data[c], hi_data[c], static_cast<int32_t>(quant_min), static_cast<int32_t>(quant_max),
        symmetric, static_cast<float>(eps));
    TORCH_CHECK_VALUE(std::isfinite(q.scale), kChooseQParams, ": the observed range [", lo_data[c],
                      ", ", hi_data[c], "]", where, " is too wide: its scale overflows float32");
    scale.mutable_data_ptr<float>()[c] = q.scale;
    zero_point.mutable_data_ptr<int32_t>()[c] = q.zero_point;
  }
  return {scale.to(min_val.device()), zero_point.to(min_val.device())};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(qext, m) {
  m.def("aminmax(Tensor input, int? axis=None) -> (Tensor, Tensor)");
  m.def("histogram(Tensor input, int bins, float min, float max) -> Tensor");
  m.def(
      "choose_qparams(Tensor min_val, Tensor max_val, int quant_min, int quant_max, "
      "bool symmetric, float eps=1.1920928955078125e-07) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(qext, CompositeExplicitAutograd, m) {
  m.impl("choose_qparams", choose_qparams_impl);
}

}  // namespace qext::ops
