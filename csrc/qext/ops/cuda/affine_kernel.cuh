// Pieces shared by the CUDA kernels of the quantization ops (included by the .cu files of this
// folder only): arithmetic that rounds exactly like qext/kernels/fake_quantize_ref.h, 8-element
// packs for vectorized memory access, the per-channel parameter walk, and one elementwise kernel
// that applies an affine map (fake quantize, quantize, dequantize) to a dense tensor in memory
// order, optionally writing the bit-packed in-range mask.
//
// Numerics: every operation is an explicitly rounded intrinsic (__fmul_rn, __fadd_rn, ...), so nvcc
// cannot contract a multiply and an add into an FMA; results are bit-identical to the CPU reference
// (which is compiled with -ffp-contract=off) and to torch's CUDA fake-quant kernels.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <ATen/cuda/detail/IntegerDivider.cuh>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "qext/ops/common/quant_params.h"

namespace qext::ops {
namespace {

constexpr int kThreads = 256;     // threads per block of the elementwise kernels
constexpr int kGroup = 8;         // elements per thread step; also the bits of one mask byte
constexpr int kBlocksPerSm = 32;  // grid cap of the grid-stride kernels, per multiprocessor

// Accumulation type: double for double, float for float, half and bfloat16.
template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

// ---- Exactly rounded arithmetic (no FMA contraction) --------------------------------------------
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double add_rn(double a, double b) { return __dadd_rn(a, b); }
__device__ __forceinline__ float sub_rn(float a, float b) { return __fsub_rn(a, b); }
__device__ __forceinline__ double sub_rn(double a, double b) { return __dsub_rn(a, b); }
// Round half to even (the current rounding mode), as std::nearbyint on the host.
__device__ __forceinline__ float round_even(float v) { return nearbyintf(v); }
__device__ __forceinline__ double round_even(double v) { return nearbyint(v); }

// Clamp that lets NaN through (fminf/fmaxf would replace it by a bound).
template <typename A>
__device__ __forceinline__ A clamp_keep_nan(A v, A lo, A hi) {
  return v < lo ? lo : (v > hi ? hi : v);
}

// One affine quantizer (a tensor or a channel): the host-resolved float constants.
struct Quantizer {
  float scale;
  float inv_scale;
  float zero_point;
};

// Unclamped level of x: nearbyint(x * inv_scale) + zero_point, NaN for NaN.
template <typename A>
__device__ __forceinline__ A quant_level(A x, const Quantizer& q) {
  return add_rn(round_even(mul_rn(x, static_cast<A>(q.inv_scale))), static_cast<A>(q.zero_point));
}

// ---- 8-element packs --------------------------------------------------------------------------
// Eight consecutive elements, aligned so that loads and stores become 16-byte (or 8-byte for
// one-byte types) vector accesses: float = 2 x 16 B, half/bfloat16 = 16 B, double = 4 x 16 B.
template <typename T>
struct alignas(sizeof(T) * kGroup >= 16 ? 16 : sizeof(T) * kGroup) Pack8 {
  T val[kGroup];
};

template <typename T>
__device__ __forceinline__ Pack8<T> load_pack(const T* p) {
  return *reinterpret_cast<const Pack8<T>*>(p);
}

template <typename T>
__device__ __forceinline__ void store_pack(T* p, const Pack8<T>& v) {
  *reinterpret_cast<Pack8<T>*>(p) = v;
}

// Whether every group of 8 elements starting at p (p + 8k) can be accessed as a Pack8.
template <typename T>
bool pack_aligned(const void* p) {
  return reinterpret_cast<uintptr_t>(p) % alignof(Pack8<T>) == 0;
}

// ---- Per-channel parameters -------------------------------------------------------------------
// The element at memory offset p belongs to channel (p / inner) % channels. params points to
// [scale(C) | inv_scale(C) | zero_point(C)] in device memory.
template <typename index_t>
struct ChannelArgs {
  const float* params = nullptr;
  index_t inner = 1;
  index_t channels = 1;
  at::cuda::detail::IntDivider<index_t> inner_div;
  at::cuda::detail::IntDivider<index_t> channels_div;
};

template <typename index_t>
__device__ __forceinline__ Quantizer load_quantizer(const ChannelArgs<index_t>& ch, index_t c) {
  return {__ldg(ch.params + c), __ldg(ch.params + ch.channels + c),
          __ldg(ch.params + 2 * ch.channels + c)};
}

// Copies the per-channel float arrays of p to the device, as one tensor of 3 * C floats
// (asynchronously, from pinned memory). Undefined tensor for per-tensor parameters.
inline at::Tensor upload_channel_params(const detail::QuantParams& p, const at::Device& device) {
  const int64_t channels = p.layout.channels;
  if (channels <= 1) return at::Tensor();
  at::Tensor host =
      at::empty({3 * channels}, at::TensorOptions().dtype(at::kFloat).pinned_memory(true));
  float* h = host.mutable_data_ptr<float>();
  std::copy(p.scale.begin(), p.scale.end(), h);
  std::copy(p.inv_scale.begin(), p.inv_scale.end(), h + channels);
  std::copy(p.zero_point.begin(), p.zero_point.end(), h + 2 * channels);
  return host.to(at::TensorOptions().device(device), /*non_blocking=*/true);
}

template <typename index_t>
ChannelArgs<index_t> make_channel_args(const detail::QuantParams& p,
                                       const at::Tensor& device_params) {
  ChannelArgs<index_t> ch;
  if (p.layout.channels > 1) {
    ch.params = device_params.const_data_ptr<float>();
    ch.inner = static_cast<index_t>(p.layout.inner);
    ch.channels = static_cast<index_t>(p.layout.channels);
    ch.inner_div = at::cuda::detail::IntDivider<index_t>(ch.inner);
    ch.channels_div = at::cuda::detail::IntDivider<index_t>(ch.channels);
  } else {
    ch.inner_div = at::cuda::detail::IntDivider<index_t>(1);
    ch.channels_div = at::cuda::detail::IntDivider<index_t>(1);
  }
  return ch;
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline int64_t multiprocessor_count() {
  return at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
}

// 32-bit index math whenever every offset fits (the divisions are much cheaper).
inline bool use_32bit_index(int64_t n) { return n <= std::numeric_limits<int32_t>::max(); }

// ---- The elementwise affine kernel ------------------------------------------------------------
// y[p] = op(x[p], quantizer of p) for the n elements of a dense tensor, in memory order. Each
// thread step handles one group of 8 consecutive elements (vector loads/stores when vec_ok and the
// group is whole) and, when mask is given, writes the group's mask byte: bit j set when element
// 8g + j is in range (little-endian bits: element i is byte i / 8, bit i % 8). The mask has
// mask_bytes >= ceil(n / 8) bytes; the padding bytes after the last group are zeroed here.
//
// Op: __device__ out_t operator()(in_t x, const Quantizer& q, bool& in_range) const.
template <typename in_t, typename out_t, typename index_t, bool kPerChannel, typename Op>
__global__ void __launch_bounds__(kThreads)
    affine_map_kernel(const in_t* __restrict__ x, out_t* __restrict__ y, index_t n, bool vec_ok,
                      Op op, Quantizer tensor_q, ChannelArgs<index_t> ch,
                      uint8_t* __restrict__ mask, index_t mask_bytes) {
  const index_t groups = (n + (kGroup - 1)) / kGroup;
  const index_t first = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const index_t stride = static_cast<index_t>(gridDim.x) * blockDim.x;
  if (mask != nullptr && first < mask_bytes - groups) mask[groups + first] = 0;

  for (index_t g = first; g < groups; g += stride) {
    const index_t p0 = g * kGroup;
    const bool whole = n - p0 >= kGroup;
    const bool vec = vec_ok && whole;

    Pack8<in_t> xv;
    if (vec) {
      xv = load_pack(x + p0);
    } else {
#pragma unroll
      for (int j = 0; j < kGroup; ++j) {
        xv.val[j] = p0 + j < n ? x[p0 + j] : static_cast<in_t>(0);
      }
    }

    Quantizer q = tensor_q;
    index_t r = 0, c = 0;  // offset inside the channel run, channel
    if constexpr (kPerChannel) {
      const auto dm = ch.inner_div.divmod(p0);
      r = dm.mod;
      c = ch.channels_div.mod(dm.div);
      q = load_quantizer(ch, c);
    }

    Pack8<out_t> yv;
    unsigned bits = 0;
#pragma unroll
    for (int j = 0; j < kGroup; ++j) {
      bool in_range = false;
      yv.val[j] = op(xv.val[j], q, in_range);
      bits |= static_cast<unsigned>(in_range) << j;
      if constexpr (kPerChannel) {
        if (j + 1 < kGroup && ++r == ch.inner) {
          r = 0;
          c = c + 1 == ch.channels ? 0 : c + 1;
          q = load_quantizer(ch, c);
        }
      }
    }

    if (vec) {
      store_pack(y + p0, yv);
    } else {
#pragma unroll
      for (int j = 0; j < kGroup; ++j) {
        if (p0 + j < n) y[p0 + j] = yv.val[j];
      }
    }
    if (mask != nullptr) {
      if (!whole) bits &= (1u << static_cast<unsigned>(n - p0)) - 1u;  // padding bits stay 0
      mask[g] = static_cast<uint8_t>(bits);
    }
  }
}

// Launches affine_map_kernel over the dense x (n elements) into y on the current stream.
// device_params: upload_channel_params(p, ...) (undefined for per-tensor). mask: nullptr or
// mask_bytes bytes, all of which are written.
template <typename in_t, typename out_t, typename Op>
void launch_affine_map(const in_t* x, out_t* y, int64_t n, const Op& op,
                       const detail::QuantParams& p, const at::Tensor& device_params,
                       uint8_t* mask = nullptr, int64_t mask_bytes = 0) {
  if (n == 0) return;
  const bool vec_ok = pack_aligned<in_t>(x) && pack_aligned<out_t>(y);
  const int64_t groups = ceil_div(n, kGroup);
  const int64_t blocks =
      std::min<int64_t>(ceil_div(groups, kThreads), multiprocessor_count() * kBlocksPerSm);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const Quantizer tensor_q{p.scale[0], p.inv_scale[0], p.zero_point[0]};
  const bool per_channel = p.layout.channels > 1;

  auto launch = [&](auto index_tag, auto per_channel_tag) {
    using index_t = decltype(index_tag);
    constexpr bool kPerChannel = decltype(per_channel_tag)::value;
    affine_map_kernel<in_t, out_t, index_t, kPerChannel, Op>
        <<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
            x, y, static_cast<index_t>(n), vec_ok, op, tensor_q,
            make_channel_args<index_t>(p, device_params), mask, static_cast<index_t>(mask_bytes));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  if (use_32bit_index(n)) {
    if (per_channel)
      launch(uint32_t{}, std::true_type{});
    else
      launch(uint32_t{}, std::false_type{});
  } else {
    if (per_channel)
      launch(uint64_t{}, std::true_type{});
    else
      launch(uint64_t{}, std::false_type{});
  }
}

}  // namespace
}  // namespace qext::ops
