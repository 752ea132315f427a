// CUDA kernels of quantize / dequantize. Same op names, signatures, output dtypes/layouts and
// errors as the CPU kernels (ops/cpu/quantize_kernel.cpp); numerics as affine_kernel.cuh.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "qext/ops/common/quant_params.h"
#include "qext/ops/cuda/affine_kernel.cuh"

namespace qext::ops {
namespace {

using detail::QuantParams;

// q = clamp(nearbyint(x * inv_scale) + zero_point, quant_min, quant_max); NaN sets *nan_flag.
template <typename in_t, typename out_t>
struct QuantizeOp {
  float quant_min;
  float quant_max;
  int* nan_flag;

  __device__ __forceinline__ out_t operator()(in_t x, const Quantizer& q, bool& in_range) const {
    using A = acc_t<in_t>;
    const A level = quant_level(static_cast<A>(x), q);
    in_range = true;
    if (level != level) {
      *nan_flag = 1;
      return static_cast<out_t>(0);
    }
    const A clamped = clamp_keep_nan(level, static_cast<A>(quant_min), static_cast<A>(quant_max));
    return static_cast<out_t>(static_cast<int32_t>(clamped));
  }
};

// x = (q - zero_point) * scale, in float (double for a double output).
template <typename in_t, typename out_t>
struct DequantizeOp {
  __device__ __forceinline__ out_t operator()(in_t v, const Quantizer& q, bool& in_range) const {
    using A = acc_t<out_t>;
    in_range = true;
    return static_cast<out_t>(
        mul_rn(sub_rn(static_cast<A>(v), static_cast<A>(q.zero_point)), static_cast<A>(q.scale)));
  }
};

at::Tensor quantize_cuda(const at::Tensor& input, const at::Tensor& scale,
                         const at::Tensor& zero_point, int64_t quant_min, int64_t quant_max,
                         std::optional<int64_t> axis, std::optional<at::ScalarType> dtype) {
  constexpr const char* op = "quantize";
  const c10::cuda::CUDAGuard guard(input.device());
  const at::Tensor x = detail::as_dense(input);
  const QuantParams p = detail::resolve_quant_params(x, scale, zero_point, quant_min, quant_max,
                                                     axis, detail::ZeroPointKind::kInteger, op);
  const at::ScalarType out_type = detail::quantized_storage_type(quant_min, quant_max, dtype, op);
  at::Tensor q = at::empty_like(x, x.options().dtype(out_type));
  if (x.numel() == 0) return q;

  const at::Tensor params = upload_channel_params(p, x.device());
  at::Tensor nan_flag = at::zeros({1}, x.options().dtype(at::kInt));
  int* flag = nan_flag.mutable_data_ptr<int>();
  const float qmin = static_cast<float>(quant_min), qmax = static_cast<float>(quant_max);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "quantize_cuda", [&] {
    using in_t = scalar_t;
    const in_t* in = x.const_data_ptr<in_t>();
    detail::visit_storage_type(out_type, [&](auto storage) {
      using out_t = decltype(storage);
      out_t* out = q.mutable_data_ptr<out_t>();
      launch_affine_map(in, out, x.numel(), QuantizeOp<in_t, out_t>{qmin, qmax, flag}, p, params);
    });
  });
  TORCH_CHECK_VALUE(nan_flag.item<int>() == 0, op,
                    ": input contains NaN, which has no integer representation");
  return q;
}

at::Tensor dequantize_cuda(const at::Tensor& input, const at::Tensor& scale,
                           const at::Tensor& zero_point, std::optional<int64_t> axis,
                           std::optional<at::ScalarType> dtype) {
  const c10::cuda::CUDAGuard guard(input.device());
  // Named references, not structured bindings: C++17 lambdas cannot capture those.
  const detail::DequantizeArgs args =
      detail::resolve_dequantize_args(input, scale, zero_point, axis, dtype);
  const at::Tensor& q = args.q;
  const QuantParams& p = args.params;
  const at::ScalarType out_type = args.out_type;
  at::Tensor x = at::empty_like(q, q.options().dtype(out_type));
  if (q.numel() == 0) return x;

  const at::Tensor params = upload_channel_params(p, q.device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out_type, "dequantize_cuda", [&] {
    using out_t = scalar_t;
    out_t* out = x.mutable_data_ptr<out_t>();
    detail::visit_storage_type(q.scalar_type(), [&](auto storage) {
      using in_t = decltype(storage);
      const in_t* in = q.const_data_ptr<in_t>();
      launch_affine_map(in, out, q.numel(), DequantizeOp<in_t, out_t>{}, p, params);
    });
  });
  return x;
}

}  // namespace

TORCH_LIBRARY_IMPL(qext, CUDA, m) {
  m.impl("quantize", quantize_cuda);
  m.impl("dequantize", dequantize_cuda);
}

}  // namespace qext::ops
