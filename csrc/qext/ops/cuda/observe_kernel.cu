// CUDA kernels of the observer statistics. Min/max use integer atomics on an order-preserving
// encoding of float (exact and independent of the order of the updates); histograms count in
// integers. Both give the same results as the CPU kernels, on every run.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>

#include "qext/kernels/observe_ref.h"
#include "qext/ops/common/observe_args.h"
#include "qext/ops/common/quant_params.h"

namespace qext::ops {
namespace {

constexpr int kThreads = 256;
constexpr int kSharedBinsMax = 8192;  // per-block shared-memory histogram up to this many bins

// Order-preserving map of float to int32 (and back): a < b as floats iff key(a) < key(b).
__device__ __forceinline__ int32_t ordered_key(float f) {
  const int32_t i = __float_as_int(f);
  return i >= 0 ? i : i ^ 0x7fffffff;
}

inline int32_t ordered_key_host(float f) {
  int32_t i;
  std::memcpy(&i, &f, sizeof(i));
  return i >= 0 ? i : i ^ 0x7fffffff;
}

inline float key_to_float_host(int32_t k) {
  const int32_t i = k >= 0 ? k : k ^ 0x7fffffff;
  float f;
  std::memcpy(&f, &i, sizeof(f));
  return f;
}

// Thread t folds the finite elements t, t + threads, ... of the dense tensor; `threads` is a
// multiple of the channel period (channels * inner), so all of them belong to channel
// (t / inner) % channels. Warps whose lanes share one channel reduce before their atomics.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    aminmax_kernel(const T* __restrict__ x, int64_t n, int64_t threads, int64_t inner,
                   int64_t channels, int32_t* __restrict__ min_keys,
                   int32_t* __restrict__ max_keys) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const bool active = t < threads;
  const int64_t c = active ? (t / inner) % channels : 0;
  float lo = INFINITY, hi = -INFINITY;
  if (active) {
    for (int64_t e = t; e < n; e += threads) {
      const float v = static_cast<float>(x[e]);
      if (isfinite(v)) {
        lo = fminf(lo, v);
        hi = fmaxf(hi, v);
      }
    }
  }
  const unsigned lanes = __ballot_sync(0xffffffffu, active);
  const int64_t c0 = __shfl_sync(0xffffffffu, c, 0);
  if (lanes == 0xffffffffu && __all_sync(0xffffffffu, c == c0)) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
      lo = fminf(lo, __shfl_down_sync(0xffffffffu, lo, offset));
      hi = fmaxf(hi, __shfl_down_sync(0xffffffffu, hi, offset));
    }
    if ((threadIdx.x & 31) != 0) return;
  }
  if (active && lo <= hi) {
    atomicMin(min_keys + c, ordered_key(lo));
    atomicMax(max_keys + c, ordered_key(hi));
  }
}

std::tuple<at::Tensor, at::Tensor> aminmax_cuda(const at::Tensor& input,
                                                std::optional<int64_t> axis) {
  const std::optional<int64_t> normalised = detail::check_aminmax_args(input, axis);
  const c10::cuda::CUDAGuard guard(input.device());
  const at::Tensor x = detail::as_dense(input);
  const detail::ChannelLayout l = detail::channel_layout(x, normalised);
  const int64_t channels = normalised.has_value() ? x.size(*normalised) : 1;
  const auto key_options = input.options().dtype(at::kInt);
  at::Tensor min_keys = at::full({channels}, ordered_key_host(INFINITY), key_options);
  at::Tensor max_keys = at::full({channels}, ordered_key_host(-INFINITY), key_options);

  const int64_t n = x.numel();
  const int64_t period = l.channels * l.inner;  // divides n
  const int64_t target =
      static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) * 2048;
  const int64_t threads =
      period * std::max<int64_t>(1, std::min<int64_t>(n / period, target / period));
  const int64_t blocks = (threads + kThreads - 1) / kThreads;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "aminmax_cuda", [&] {
    aminmax_kernel<scalar_t>
        <<<static_cast<unsigned>(blocks), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
            x.const_data_ptr<scalar_t>(), n, threads, l.inner, l.channels,
            min_keys.mutable_data_ptr<int32_t>(), max_keys.mutable_data_ptr<int32_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });

  // Decode the keys (C values) on the host.
  const at::Tensor lo_keys = min_keys.cpu(), hi_keys = max_keys.cpu();
  at::Tensor min_val = at::empty({channels}, lo_keys.options().dtype(at::kFloat));
  at::Tensor max_val = at::empty({channels}, lo_keys.options().dtype(at::kFloat));
  for (int64_t c = 0; c < channels; ++c) {
    min_val.mutable_data_ptr<float>()[c] = key_to_float_host(lo_keys.const_data_ptr<int32_t>()[c]);
    max_val.mutable_data_ptr<float>()[c] = key_to_float_host(hi_keys.const_data_ptr<int32_t>()[c]);
  }
  return {min_val.to(input.device()), max_val.to(input.device())};
}

// Grid-stride histogram; with shared_counts, each block counts in shared memory first.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    histogram_kernel(const T* __restrict__ x, int64_t n, double lo, double hi, double inv_width,
                     int64_t bins, bool shared_counts, unsigned long long* __restrict__ counts) {
  extern __shared__ unsigned int block_counts[];
  if (shared_counts) {
    for (int64_t b = threadIdx.x; b < bins; b += blockDim.x) block_counts[b] = 0;
    __syncthreads();
  }
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += stride) {
    const int64_t b = kernels::histogram_bin(static_cast<double>(x[i]), lo, hi, inv_width, bins);
    if (b < 0) continue;
    if (shared_counts) {
      atomicAdd(block_counts + b, 1u);
    } else {
      atomicAdd(counts + b, 1ull);
    }
  }
  if (shared_counts) {
    __syncthreads();
    for (int64_t b = threadIdx.x; b < bins; b += blockDim.x) {
      if (block_counts[b] != 0)
        atomicAdd(counts + b, static_cast<unsigned long long>(block_counts[b]));
    }
  }
}

at::Tensor histogram_cuda(const at::Tensor& input, int64_t bins, double min, double max) {
  detail::check_histogram_args(input, bins, min, max);
  const c10::cuda::CUDAGuard guard(input.device());
  const at::Tensor x = detail::as_dense(input);
  at::Tensor counts = at::zeros({bins}, input.options().dtype(at::kLong));
  const int64_t n = x.numel();
  if (n == 0) return counts;
  const double inv_width = static_cast<double>(bins) / (max - min);
  const bool shared_counts = bins <= kSharedBinsMax;
  const size_t shared_bytes = shared_counts ? static_cast<size_t>(bins) * sizeof(unsigned int) : 0;
  const int64_t max_blocks =
      static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) * 8;
  const int64_t blocks = std::min<int64_t>((n + kThreads - 1) / kThreads, max_blocks);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "histogram_cuda", [&] {
    histogram_kernel<scalar_t><<<static_cast<unsigned>(blocks), kThreads, shared_bytes,
                                 at::cuda::getCurrentCUDAStream()>>>(
        x.const_data_ptr<scalar_t>(), n, min, max, inv_width, bins, shared_counts,
        reinterpret_cast<unsigned long long*>(counts.mutable_data_ptr<int64_t>()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return counts;
}

}  // namespace

TORCH_LIBRARY_IMPL(qext, CUDA, m) {
  m.impl("aminmax", aminmax_cuda);
  m.impl("histogram", histogram_cuda);
}

}  // namespace qext::ops
