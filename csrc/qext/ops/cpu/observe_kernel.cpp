// CPU kernels of the observer statistics: per-thread partial results (min/max per channel,
// integer histogram counts) combined after the parallel pass, so results do not depend on timing.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <tuple>
#include <vector>

#include "qext/kernels/fake_quantize_avx2.h"
#include "qext/kernels/observe_avx2.h"
#include "qext/kernels/observe_ref.h"
#include "qext/ops/common/observe_args.h"
#include "qext/ops/common/quant_params.h"

namespace qext::ops {
namespace {

constexpr int64_t kGrain = 32768;
constexpr float kInf = std::numeric_limits<float>::infinity();

// Min/max kernels: AVX2 for float32 where the CPU has it, the scalar reference otherwise.
template <typename T>
void minmax_run(const T* x, int64_t n, float* lo, float* hi) {
  kernels::minmax_finite_ref(x, n, lo, hi);
}

template <>
void minmax_run<float>(const float* x, int64_t n, float* lo, float* hi) {
  if (kernels::cpu_has_avx2()) {
    kernels::minmax_finite_avx2(x, n, lo, hi);
  } else {
    kernels::minmax_finite_ref(x, n, lo, hi);
  }
}

template <typename T>
void minmax_per_element(const T* x, int64_t n, float* lo, float* hi) {
  kernels::minmax_finite_per_element_ref(x, n, lo, hi);
}

template <>
void minmax_per_element<float>(const float* x, int64_t n, float* lo, float* hi) {
  if (kernels::cpu_has_avx2()) {
    kernels::minmax_finite_per_element_avx2(x, n, lo, hi);
  } else {
    kernels::minmax_finite_per_element_ref(x, n, lo, hi);
  }
}

std::tuple<at::Tensor, at::Tensor> aminmax_cpu(const at::Tensor& input,
                                               std::optional<int64_t> axis) {
  const std::optional<int64_t> normalised = detail::check_aminmax_args(input, axis);
  const at::Tensor x = detail::as_dense(input);
  const detail::ChannelLayout l = detail::channel_layout(x, normalised);
  const int64_t channels = normalised.has_value() ? x.size(*normalised) : 1;
  const int threads = at::get_num_threads();
  std::vector<float> lo_parts(static_cast<size_t>(threads) * l.channels, kInf);
  std::vector<float> hi_parts(static_cast<size_t>(threads) * l.channels, -kInf);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "aminmax", [&] {
    const scalar_t* data = x.const_data_ptr<scalar_t>();
    at::parallel_for(0, x.numel(), kGrain, [&](int64_t begin, int64_t end) {
      float* lo = lo_parts.data() + at::get_thread_num() * l.channels;
      float* hi = hi_parts.data() + at::get_thread_num() * l.channels;
      for (int64_t pos = begin; pos < end;) {
        int64_t len;
        if (l.channels == 1) {
          len = end - pos;
          minmax_run(data + pos, len, lo, hi);
        } else if (l.inner == 1) {  // channels innermost: one channel per element
          const int64_t c = pos % l.channels;
          len = std::min(end - pos, l.channels - c);
          minmax_per_element(data + pos, len, lo + c, hi + c);
        } else {
          const int64_t c = (pos / l.inner) % l.channels;
          len = std::min(end - pos, l.inner - pos % l.inner);
          minmax_run(data + pos, len, lo + c, hi + c);
        }
        pos += len;
      }
    });
  });

  const auto options = input.options().dtype(at::kFloat);
  at::Tensor min_val = at::empty({channels}, options), max_val = at::empty({channels}, options);
  float* min_out = min_val.mutable_data_ptr<float>();
  float* max_out = max_val.mutable_data_ptr<float>();
  for (int64_t c = 0; c < channels; ++c) {
    float lo = kInf, hi = -kInf;
    for (int t = 0; t < threads; ++t) {
      lo = std::min(lo, lo_parts[t * l.channels + c]);
      hi = std::max(hi, hi_parts[t * l.channels + c]);
    }
    min_out[c] = lo;
    max_out[c] = hi;
  }
  return {min_val, max_val};
}

at::Tensor histogram_cpu(const at::Tensor& input, int64_t bins, double min, double max) {
  detail::check_histogram_args(input, bins, min, max);
  const at::Tensor x = detail::as_dense(input);
  const double inv_width = static_cast<double>(bins) / (max - min);
  const int threads = at::get_num_threads();
  std::vector<int64_t> parts(static_cast<size_t>(threads) * bins, 0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "histogram", [&] {
    const scalar_t* data = x.const_data_ptr<scalar_t>();
    at::parallel_for(0, x.numel(), kGrain, [&](int64_t begin, int64_t end) {
      kernels::histogram_ref(data + begin, end - begin, min, max, inv_width, bins,
                             parts.data() + at::get_thread_num() * bins);
    });
  });
  at::Tensor counts = at::empty({bins}, input.options().dtype(at::kLong));
  int64_t* out = counts.mutable_data_ptr<int64_t>();
  for (int64_t b = 0; b < bins; ++b) {
    int64_t total = 0;
    for (int t = 0; t < threads; ++t) total += parts[t * bins + b];
    out[b] = total;
  }
  return counts;
}

}  // namespace

TORCH_LIBRARY_IMPL(qext, CPU, m) {
  m.impl("aminmax", aminmax_cpu);
  m.impl("histogram", histogram_cpu);
}

}  // namespace qext::ops
