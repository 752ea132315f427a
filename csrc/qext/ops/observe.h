// Statistics for observers: finite min/max, deterministic histograms, and scale / zero point
// from an observed range.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <tuple>

namespace qext::ops {

// Min and max of the finite values (NaN and +-inf skipped), float32, shape [1] (per-tensor) or
// [C] along `axis`. A channel without a finite value gets min = +inf, max = -inf.
std::tuple<at::Tensor, at::Tensor> aminmax(const at::Tensor& input,
                                           std::optional<int64_t> axis = std::nullopt);

// int64 counts of the finite values of input in [min, max] over `bins` equal bins (values outside
// are not counted; max falls in the last bin). Exact and deterministic on every device.
at::Tensor histogram(const at::Tensor& input, int64_t bins, double min, double max);

// float32 scale and int32 zero point from observed ranges (torch.ao's formulas), shaped like
// min_val. Symmetric signed ranges get zero point 0, symmetric unsigned ones the middle level.
std::tuple<at::Tensor, at::Tensor> choose_qparams(const at::Tensor& min_val,
                                                  const at::Tensor& max_val, int64_t quant_min,
                                                  int64_t quant_max, bool symmetric,
                                                  double eps = 1.1920928955078125e-07);

}  // namespace qext::ops
