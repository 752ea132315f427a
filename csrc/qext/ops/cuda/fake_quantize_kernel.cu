// CUDA kernels of the fake-quantization ops. Same op names, signatures, output layouts and errors
// as the CPU kernels (ops/cpu/fake_quantize_kernel.cpp), same numerics as
// qext/kernels/fake_quantize_ref.h (see affine_kernel.cuh).
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

#include "qext/ops/common/quant_params.h"
#include "qext/ops/cuda/affine_kernel.cuh"

namespace qext::ops {
namespace {

using detail::QuantParams;

// ---- Forward --------------------------------------------------------------------------------
template <typename T>
struct FakeQuantizeOp {
  float quant_min;
  float quant_max;

  __device__ __forceinline__ T operator()(T x, const Quantizer& q, bool& in_range) const {
    using A = acc_t<T>;
    const A lo = static_cast<A>(quant_min), hi = static_cast<A>(quant_max);
    const A level = quant_level(static_cast<A>(x), q);
    in_range = level >= lo && level <= hi;
    const A clamped = clamp_keep_nan(level, lo, hi);
    return static_cast<T>(
        mul_rn(sub_rn(clamped, static_cast<A>(q.zero_point)), static_cast<A>(q.scale)));
  }
};

// y = fake_quantize(x) over the dense tensor x (y has its layout); mask: nullptr or the packed
// mask.
void fake_quantize_into(const at::Tensor& x, at::Tensor& y, uint8_t* mask, int64_t mask_bytes,
                        const QuantParams& p) {
  const at::Tensor params = upload_channel_params(p, x.device());
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "fake_quantize_cuda", [&] {
        const FakeQuantizeOp<scalar_t> op{static_cast<float>(p.quant_min),
                                          static_cast<float>(p.quant_max)};
        launch_affine_map(x.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(), x.numel(),
                          op, p, params, mask, mask_bytes);
      });
}

// Forward of fake_quantize (integer zero point) and fake_quantize_learnable (real zero point).
at::Tensor fake_quantize_forward(const at::Tensor& input, const at::Tensor& scale,
                                 const at::Tensor& zero_point, int64_t quant_min, int64_t quant_max,
                                 std::optional<int64_t> axis, detail::ZeroPointKind kind,
                                 const char* op) {
  const c10::cuda::CUDAGuard guard(input.device());
  const at::Tensor x = detail::as_dense(input);
  const QuantParams p =
      detail::resolve_quant_params(x, scale, zero_point, quant_min, quant_max, axis, kind, op);
  at::Tensor y = at::empty_like(x);
  fake_quantize_into(x, y, nullptr, 0, p);
  return y;
}

at::Tensor fake_quantize_cuda(const at::Tensor& input, const at::Tensor& scale,
                              const at::Tensor& zero_point, int64_t quant_min, int64_t quant_max,
                              std::optional<int64_t> axis) {
  return fake_quantize_forward(input, scale, zero_point, quant_min, quant_max, axis,
                               detail::ZeroPointKind::kInteger, "fake_quantize");
}

std::tuple<at::Tensor, at::Tensor> fake_quantize_with_mask_cuda(
    const at::Tensor& input, const at::Tensor& scale, const at::Tensor& zero_point,
    int64_t quant_min, int64_t quant_max, std::optional<int64_t> axis) {
  const c10::cuda::CUDAGuard guard(input.device());
  const at::Tensor x = detail::as_dense(input);
  const QuantParams p =
      detail::resolve_quant_params(x, scale, zero_point, quant_min, quant_max, axis,
                                   detail::ZeroPointKind::kInteger, "fake_quantize");
  at::Tensor y = at::empty_like(x);
  // Every byte (padding included) is written by the kernel: no memset needed.
  const int64_t mask_bytes = detail::packed_mask_bytes(x.numel());
  at::Tensor mask = at::empty({mask_bytes}, x.options().dtype(at::kByte));
  fake_quantize_into(x, y, mask.mutable_data_ptr<uint8_t>(), mask_bytes, p);
  return {y, mask};
}

// ---- Straight-through backward ----------------------------------------------------------------
// dx[i] = bit i of mask ? dy[i] : +0, one mask byte (8 elements) per thread step.
template <typename T, typename index_t>
__global__ void __launch_bounds__(kThreads)
    fake_quantize_mask_backward_kernel(const T* __restrict__ dy, const uint8_t* __restrict__ mask,
                                       T* __restrict__ dx, index_t n, bool vec_ok) {
  const index_t groups = (n + (kGroup - 1)) / kGroup;
  const index_t stride = static_cast<index_t>(gridDim.x) * blockDim.x;
  for (index_t g = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x; g < groups;
       g += stride) {
    const index_t p0 = g * kGroup;
    const unsigned bits = mask[g];
    if (vec_ok && n - p0 >= kGroup) {
      const Pack8<T> v = load_pack(dy + p0);
      Pack8<T> out;
#pragma unroll
      for (int j = 0; j < kGroup; ++j) {
        out.val[j] = (bits >> j) & 1u ? v.val[j] : static_cast<T>(0.0f);
      }
      store_pack(dx + p0, out);
    } else {
#pragma unroll
      for (int j = 0; j < kGroup; ++j) {
        if (p0 + j < n) dx[p0 + j] = (bits >> j) & 1u ? dy[p0 + j] : static_cast<T>(0.0f);
      }
    }
  }
}

at::Tensor fake_quantize_mask_backward_cuda(const at::Tensor& grad, const at::Tensor& mask) {
  constexpr const char* op = "fake_quantize backward";
  detail::check_float_input(grad, op, "grad");
  TORCH_CHECK(grad.is_non_overlapping_and_dense(), op, ": grad must be dense");
  TORCH_CHECK(mask.scalar_type() == at::kByte && mask.dim() == 1 && mask.is_contiguous() &&
                  mask.numel() == detail::packed_mask_bytes(grad.numel()),
              op, ": mask must be a contiguous uint8 tensor of ",
              detail::packed_mask_bytes(grad.numel()), " bytes for ", grad.numel(),
              " elements, got ", mask.scalar_type(), " of shape ", mask.sizes());
  TORCH_CHECK(mask.device() == grad.device(), op,
              ": grad and mask must be on the same device, got ", grad.device(), " and ",
              mask.device());
  const c10::cuda::CUDAGuard guard(grad.device());
  at::Tensor dx = at::empty_like(grad);
  const int64_t n = grad.numel();
  if (n == 0) return dx;
  const uint8_t* bits = mask.const_data_ptr<uint8_t>();
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int64_t blocks = std::min<int64_t>(ceil_div(ceil_div(n, kGroup), kThreads),
                                           multiprocessor_count() * kBlocksPerSm);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, grad.scalar_type(), "fake_quantize_backward_cuda", [&] {
        const scalar_t* dy = grad.const_data_ptr<scalar_t>();
        scalar_t* out = dx.mutable_data_ptr<scalar_t>();
        const bool vec_ok = pack_aligned<scalar_t>(dy) && pack_aligned<scalar_t>(out);
        if (use_32bit_index(n)) {
          fake_quantize_mask_backward_kernel<scalar_t, uint32_t>
              <<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
                  dy, bits, out, static_cast<uint32_t>(n), vec_ok);
        } else {
          fake_quantize_mask_backward_kernel<scalar_t, uint64_t>
              <<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
                  dy, bits, out, static_cast<uint64_t>(n), vec_ok);
        }
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  return dx;
}

// ---- Learnable (LSQ / LSQ+) ---------------------------------------------------------------------
at::Tensor fake_quantize_learnable_cuda(const at::Tensor& input, const at::Tensor& scale,
                                        const at::Tensor& zero_point, int64_t quant_min,
                                        int64_t quant_max, double grad_factor,
                                        std::optional<int64_t> axis) {
  return fake_quantize_forward(input, scale, zero_point, quant_min, quant_max, axis,
                               detail::ZeroPointKind::kLearnable, "fake_quantize_learnable");
}

// Per-element gradient terms before grad_factor, as learnable_grad_value in fake_quantize_ref.h:
//   in range:  dx = dy, dscale = dy * (x_fq - x) * inv_scale, dzero_point = 0
//   outside:   dx = 0,  dscale = dy * (clamped_level - zero_point), dzero_point = -dy * scale
//   NaN input: all 0.
template <typename A>
struct LearnableTerms {
  A dx, dscale, dzero_point;
};

template <typename A>
__device__ __forceinline__ LearnableTerms<A> learnable_terms(A x, A g, const Quantizer& q, A lo,
                                                             A hi) {
  const A level = quant_level(x, q);
  const A zp = static_cast<A>(q.zero_point), scale = static_cast<A>(q.scale);
  if (level >= lo && level <= hi) {
    const A x_fq = mul_rn(sub_rn(level, zp), scale);
    return {g, mul_rn(mul_rn(g, sub_rn(x_fq, x)), static_cast<A>(q.inv_scale)), A(0)};
  }
  if (level != level) return {A(0), A(0), A(0)};
  const A clamped = level < lo ? lo : hi;
  return {A(0), mul_rn(g, sub_rn(clamped, zp)), mul_rn(-g, scale)};
}

// Computes the terms of element i (x[i], dy[i]), writes dx[i] and adds the two sums.
template <typename T>
__device__ __forceinline__ T learnable_element(T x, T dy, const Quantizer& q, float quant_min,
                                               float quant_max, double& sum_s, double& sum_z) {
  using A = acc_t<T>;
  const LearnableTerms<A> t = learnable_terms(static_cast<A>(x), static_cast<A>(dy), q,
                                              static_cast<A>(quant_min), static_cast<A>(quant_max));
  sum_s += static_cast<double>(t.dscale);
  sum_z += static_cast<double>(t.dzero_point);
  return static_cast<T>(t.dx);
}

// Sums a and b over the block (blockDim.x a multiple of 32, at most kThreads); the block's totals
// end up in thread 0. Contains __syncthreads: every thread of the block must call it.
__device__ __forceinline__ void block_sum2(double& a, double& b) {
  __shared__ double part_a[kThreads / 32], part_b[kThreads / 32];
  const unsigned lane = threadIdx.x & 31u, warp = threadIdx.x >> 5;
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    a += __shfl_down_sync(0xffffffffu, a, offset);
    b += __shfl_down_sync(0xffffffffu, b, offset);
  }
  if (lane == 0) {
    part_a[warp] = a;
    part_b[warp] = b;
  }
  __syncthreads();
  if (warp == 0) {
    const unsigned warps = blockDim.x >> 5;
    a = lane < warps ? part_a[lane] : 0.0;
    b = lane < warps ? part_b[lane] : 0.0;
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
      a += __shfl_down_sync(0xffffffffu, a, offset);
      b += __shfl_down_sync(0xffffffffu, b, offset);
    }
  }
  __syncthreads();  // part_a/part_b may be reused by the next call
}

// Learnable backward over rows of one quantizer: `rows` rows of row_len consecutive elements, row r
// using channel r % channels (per-tensor: one row of n elements, params == nullptr and the
// quantizer tensor_q). Blocks stride over the rows in y and over the row's 8-element groups in x;
// after each row the block sums its terms and adds them to the channel's double accumulators.
// vec_ok: x, dy, dx are Pack8-aligned and so is every row start.
template <typename T, typename index_t>
__global__ void __launch_bounds__(kThreads)
    fake_quantize_learnable_backward_rows_kernel(const T* __restrict__ x, const T* __restrict__ dy,
                                                 T* __restrict__ dx, index_t rows, index_t row_len,
                                                 index_t channels, const float* __restrict__ params,
                                                 Quantizer tensor_q, float quant_min,
                                                 float quant_max, bool vec_ok,
                                                 double* __restrict__ dscale_sum,
                                                 double* __restrict__ dzp_sum) {
  const index_t groups = (row_len + (kGroup - 1)) / kGroup;
  const index_t first = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const index_t stride = static_cast<index_t>(gridDim.x) * blockDim.x;
  for (index_t r = blockIdx.y; r < rows; r += gridDim.y) {
    index_t c = 0;
    Quantizer q = tensor_q;
    if (params != nullptr) {
      c = r % channels;
      q = {__ldg(params + c), __ldg(params + channels + c), __ldg(params + 2 * channels + c)};
    }
    const T* xr = x + r * row_len;
    const T* gr = dy + r * row_len;
    T* dxr = dx + r * row_len;
    double sum_s = 0.0, sum_z = 0.0;
    for (index_t g = first; g < groups; g += stride) {
      const index_t i0 = g * kGroup;
      if (vec_ok && row_len - i0 >= kGroup) {
        const Pack8<T> xv = load_pack(xr + i0);
        const Pack8<T> gv = load_pack(gr + i0);
        Pack8<T> out;
#pragma unroll
        for (int j = 0; j < kGroup; ++j) {
          out.val[j] =
              learnable_element(xv.val[j], gv.val[j], q, quant_min, quant_max, sum_s, sum_z);
        }
        store_pack(dxr + i0, out);
      } else {
#pragma unroll
        for (int j = 0; j < kGroup; ++j) {
          if (i0 + j < row_len) {
            dxr[i0 + j] =
                learnable_element(xr[i0 + j], gr[i0 + j], q, quant_min, quant_max, sum_s, sum_z);
          }
        }
      }
    }
    block_sum2(sum_s, sum_z);
    if (threadIdx.x == 0) {
      if (sum_s != 0.0) atomicAdd(dscale_sum + c, sum_s);
      if (sum_z != 0.0) atomicAdd(dzp_sum + c, sum_z);
    }
  }
}

// Learnable backward for per-channel layouts with short channel runs (small inner): the channel
// pattern repeats every period = channels * inner elements, and `threads` (a multiple of the
// period, at most n) threads each take the elements t, t + threads, ..., which all belong to
// channel (t / inner) % channels, so a thread sums in registers without ever switching channel.
// Blocks then combine their threads' sums per channel before one atomicAdd per channel and block.
template <typename T, typename index_t>
__global__ void __launch_bounds__(kThreads) fake_quantize_learnable_backward_periodic_kernel(
    const T* __restrict__ x, const T* __restrict__ dy, T* __restrict__ dx, index_t n,
    index_t threads, index_t inner, index_t channels, const float* __restrict__ params,
    float quant_min, float quant_max, double* __restrict__ dscale_sum,
    double* __restrict__ dzp_sum) {
  __shared__ double sums_s[kThreads], sums_z[kThreads];
  __shared__ index_t chan[kThreads];

  const index_t t = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  double sum_s = 0.0, sum_z = 0.0;
  index_t c = channels;  // "no channel" for the idle threads of the last block
  if (t < threads) {
    c = (t / inner) % channels;
    const Quantizer q{__ldg(params + c), __ldg(params + channels + c),
                      __ldg(params + 2 * channels + c)};
    for (index_t e = t; e < n; e += threads) {
      dx[e] = learnable_element(x[e], dy[e], q, quant_min, quant_max, sum_s, sum_z);
    }
  }
  sums_s[threadIdx.x] = sum_s;
  sums_z[threadIdx.x] = sum_z;
  chan[threadIdx.x] = c;
  __syncthreads();

  if (channels <= blockDim.x) {
    // Few channels, each possibly held by many threads of the block: thread c sums channel c.
    if (threadIdx.x < channels) {
      double a = 0.0, b = 0.0;
      for (unsigned k = 0; k < blockDim.x; ++k) {
        if (chan[k] == threadIdx.x) {
          a += sums_s[k];
          b += sums_z[k];
        }
      }
      if (a != 0.0) atomicAdd(dscale_sum + threadIdx.x, a);
      if (b != 0.0) atomicAdd(dzp_sum + threadIdx.x, b);
    }
  } else if ((threadIdx.x & 31u) == 0) {
    // Many channels: within a warp (32 consecutive threads, fewer than the period) the threads of
    // one channel are consecutive, so lane 0 adds up runs.
    const unsigned base = threadIdx.x;
    index_t run = chan[base];
    double a = sums_s[base], b = sums_z[base];
    for (unsigned k = 1; k <= 32; ++k) {
      const bool end = k == 32 || chan[base + k] != run;
      if (end) {
        if (run < channels) {
          if (a != 0.0) atomicAdd(dscale_sum + run, a);
          if (b != 0.0) atomicAdd(dzp_sum + run, b);
        }
        if (k == 32) break;
        run = chan[base + k];
        a = 0.0;
        b = 0.0;
      }
      a += sums_s[base + k];
      b += sums_z[base + k];
    }
  }
}

// Channel runs shorter than this go to the periodic kernel, longer ones to the rows kernel.
constexpr int64_t kRowsKernelMinInner = 256;

template <typename T, typename index_t>
void launch_learnable_backward(const T* x, const T* dy, T* dx, int64_t n, const QuantParams& p,
                               const at::Tensor& params, double* dscale_sum, double* dzp_sum) {
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int64_t target_threads = multiprocessor_count() * 2048;
  const float qmin = static_cast<float>(p.quant_min), qmax = static_cast<float>(p.quant_max);
  const Quantizer tensor_q{p.scale[0], p.inv_scale[0], p.zero_point[0]};
  const auto& l = p.layout;
  const bool per_channel = l.channels > 1;

  if (!per_channel || l.inner >= kRowsKernelMinInner) {
    const int64_t rows = per_channel ? l.outer * l.channels : 1;
    const int64_t row_len = per_channel ? l.inner : n;
    const int64_t groups = ceil_div(row_len, kGroup);
    const int64_t threads = std::min<int64_t>(kThreads, ceil_div(groups, 32) * 32);
    const int64_t grid_y = std::min<int64_t>(rows, 65535);
    const int64_t grid_x = std::max<int64_t>(
        1, std::min<int64_t>(ceil_div(groups, threads), target_threads / (threads * grid_y)));
    const bool vec_ok =
        pack_aligned<T>(x) && pack_aligned<T>(dy) && pack_aligned<T>(dx) &&
        (rows == 1 || (row_len * static_cast<int64_t>(sizeof(T))) % alignof(Pack8<T>) == 0);
    const dim3 grid(static_cast<unsigned>(grid_x), static_cast<unsigned>(grid_y));
    fake_quantize_learnable_backward_rows_kernel<T, index_t>
        <<<grid, static_cast<unsigned>(threads), 0, stream>>>(
            x, dy, dx, static_cast<index_t>(rows), static_cast<index_t>(row_len),
            static_cast<index_t>(l.channels),
            per_channel ? params.const_data_ptr<float>() : nullptr, tensor_q, qmin, qmax, vec_ok,
            dscale_sum, dzp_sum);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  } else {
    const int64_t period = l.channels * l.inner;  // divides n
    const int64_t repeats =
        std::max<int64_t>(1, std::min<int64_t>(l.outer, target_threads / period));
    const int64_t threads = period * repeats;
    fake_quantize_learnable_backward_periodic_kernel<T, index_t>
        <<<static_cast<unsigned>(ceil_div(threads, kThreads)), kThreads, 0, stream>>>(
            x, dy, dx, static_cast<index_t>(n), static_cast<index_t>(threads),
            static_cast<index_t>(l.inner), static_cast<index_t>(l.channels),
            params.const_data_ptr<float>(), qmin, qmax, dscale_sum, dzp_sum);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fake_quantize_learnable_backward_cuda(
    const at::Tensor& grad, const at::Tensor& input, const at::Tensor& scale,
    const at::Tensor& zero_point, int64_t quant_min, int64_t quant_max, double grad_factor,
    std::optional<int64_t> axis) {
  constexpr const char* op = "fake_quantize_learnable backward";
  const c10::cuda::CUDAGuard guard(input.device());
  const at::Tensor x = detail::as_dense(input);
  const QuantParams p = detail::resolve_quant_params(x, scale, zero_point, quant_min, quant_max,
                                                     axis, detail::ZeroPointKind::kLearnable, op);
  detail::check_float_input(grad, op, "grad");
  TORCH_CHECK(grad.sizes() == x.sizes() && grad.scalar_type() == x.scalar_type(), op,
              ": grad must match input in shape and dtype, got ", grad.sizes(), " ",
              grad.scalar_type(), " for input ", x.sizes(), " ", x.scalar_type());
  TORCH_CHECK(grad.device() == x.device(), op, ": grad and input must be on the same device, got ",
              grad.device(), " and ", x.device());
  const at::Tensor dy = detail::align_to_layout(grad, x.sizes(), x.strides());
  at::Tensor dx = at::empty_like(x);

  // Per-channel sums in double, accumulated by the kernel (no full-size temporaries).
  const int64_t channels = p.layout.channels;
  at::Tensor dscale = at::zeros({channels}, scale.options().dtype(at::kDouble));
  at::Tensor dzp = at::zeros({channels}, scale.options().dtype(at::kDouble));
  const int64_t n = x.numel();
  if (n > 0) {
    const at::Tensor params = upload_channel_params(p, x.device());
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, x.scalar_type(), "fake_quantize_learnable_backward_cuda", [&] {
          const scalar_t* in = x.const_data_ptr<scalar_t>();
          const scalar_t* g = dy.const_data_ptr<scalar_t>();
          scalar_t* out = dx.mutable_data_ptr<scalar_t>();
          double* s = dscale.mutable_data_ptr<double>();
          double* z = dzp.mutable_data_ptr<double>();
          if (use_32bit_index(n)) {
            launch_learnable_backward<scalar_t, uint32_t>(in, g, out, n, p, params, s, z);
          } else {
            launch_learnable_backward<scalar_t, uint64_t>(in, g, out, n, p, params, s, z);
          }
        });
  }
  auto [dscale_grad, dzp_grad] =
      detail::learnable_param_grads(dscale, dzp, scale, zero_point, grad_factor);
  return {dx, dscale_grad, dzp_grad};
}

}  // namespace

TORCH_LIBRARY_IMPL(qext, CUDA, m) {
  m.impl("fake_quantize", fake_quantize_cuda);
  m.impl("_fake_quantize_with_mask", fake_quantize_with_mask_cuda);
  m.impl("_fake_quantize_mask_backward", fake_quantize_mask_backward_cuda);
  m.impl("fake_quantize_learnable", fake_quantize_learnable_cuda);
  m.impl("_fake_quantize_learnable_backward", fake_quantize_learnable_backward_cuda);
}

}  // namespace qext::ops
