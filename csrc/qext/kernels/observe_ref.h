// Scalar reference kernels of the observer statistics. Framework-free: raw pointers in and out.
// Non-finite values (NaN, +-inf) are skipped everywhere: a statistic that saw no finite value
// stays at its identity (min = +inf, max = -inf, counts 0).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

// histogram_bin is also called from CUDA kernels.
#if defined(__CUDACC__)
#define QEXT_HOST_DEVICE __host__ __device__
#else
#define QEXT_HOST_DEVICE
#endif

namespace qext::kernels {

// Folds the finite values of x[0..n) into *min_val / *max_val.
template <typename T>
void minmax_finite_ref(const T* x, int64_t n, float* min_val, float* max_val) {
  float lo = *min_val, hi = *max_val;
  for (int64_t i = 0; i < n; ++i) {
    const float v = static_cast<float>(x[i]);
    if (std::isfinite(v)) {
      lo = std::min(lo, v);
      hi = std::max(hi, v);
    }
  }
  *min_val = lo;
  *max_val = hi;
}

// Element i of x updates min_vals[i] / max_vals[i] (one channel per element).
template <typename T>
void minmax_finite_per_element_ref(const T* x, int64_t n, float* min_vals, float* max_vals) {
  for (int64_t i = 0; i < n; ++i) {
    const float v = static_cast<float>(x[i]);
    if (std::isfinite(v)) {
      min_vals[i] = std::min(min_vals[i], v);
      max_vals[i] = std::max(max_vals[i], v);
    }
  }
}

// The histogram bin of v over [lo, lo + bins / inv_width], or -1 when v is outside or not finite.
// inv_width = bins / (hi - lo) in double; the same double arithmetic on every device.
QEXT_HOST_DEVICE inline int64_t histogram_bin(double v, double lo, double hi, double inv_width,
                                              int64_t bins) {
  if (!(v >= lo && v <= hi)) return -1;  // also rejects NaN
  const int64_t b = static_cast<int64_t>(::floor((v - lo) * inv_width));
  return b < bins - 1 ? b : bins - 1;
}

template <typename T>
void histogram_ref(const T* x, int64_t n, double lo, double hi, double inv_width, int64_t bins,
                   int64_t* counts) {
  for (int64_t i = 0; i < n; ++i) {
    const int64_t b = histogram_bin(static_cast<double>(x[i]), lo, hi, inv_width, bins);
    if (b >= 0) ++counts[b];
  }
}

// Scale and zero point from an observed range, with torch.ao's float32 formulas.
struct QParams {
  float scale;
  int32_t zero_point;
};

inline QParams choose_qparams_ref(float min_val, float max_val, int32_t quant_min,
                                  int32_t quant_max, bool symmetric, float eps) {
  const float min_neg = std::min(min_val, 0.0f);
  const float max_pos = std::max(max_val, 0.0f);
  if (symmetric) {
    const float half_levels = static_cast<float>(quant_max - quant_min) / 2.0f;
    const float scale = std::max(std::max(-min_neg, max_pos) / half_levels, eps);
    // Signed ranges are centred on 0; unsigned ones on their middle (128 for [0, 255]).
    const int32_t zero_point = quant_min < 0 ? 0 : (quant_min + quant_max + 1) / 2;
    return {scale, zero_point};
  }
  const float scale =
      std::max((max_pos - min_neg) / static_cast<float>(quant_max - quant_min), eps);
  const float zp = static_cast<float>(quant_min) - std::nearbyint(min_neg / scale);
  const float clamped =
      std::min(std::max(zp, static_cast<float>(quant_min)), static_cast<float>(quant_max));
  return {scale, static_cast<int32_t>(clamped)};
}

}  // namespace qext::kernels
