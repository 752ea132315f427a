// CPU kernels of quantize / dequantize (scalar loops over channel runs, parallel over blocks).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>

#include "qext/kernels/fake_quantize_ref.h"
#include "qext/ops/common/quant_params.h"

namespace qext::ops {
namespace {

using detail::QuantParams;

constexpr int64_t kGrain = 32768;

// Calls f(begin, end, channel) for the runs of [begin, end) that belong to one channel.
template <typename F>
void for_each_channel_run(const QuantParams& p, int64_t begin, int64_t end, F&& f) {
  const auto& l = p.layout;
  if (l.channels == 1) {
    f(begin, end, 0);
    return;
  }
  for (int64_t pos = begin; pos < end;) {
    const int64_t channel = (pos / l.inner) % l.channels;
    const int64_t len = std::min(end - pos, l.inner - pos % l.inner);
    f(pos, pos + len, channel);
    pos += len;
  }
}

at::Tensor quantize_cpu(const at::Tensor& input, const at::Tensor& scale,
                        const at::Tensor& zero_point, int64_t quant_min, int64_t quant_max,
                        std::optional<int64_t> axis, std::optional<at::ScalarType> dtype) {
  constexpr const char* op = "quantize";
  const at::Tensor x = detail::as_dense(input);
  const QuantParams p = detail::resolve_quant_params(x, scale, zero_point, quant_min, quant_max,
                                                     axis, detail::ZeroPointKind::kInteger, op);
  const at::ScalarType out_type = detail::quantized_storage_type(quant_min, quant_max, dtype, op);
  at::Tensor q = at::empty_like(x, x.options().dtype(out_type));
  std::atomic<bool> saw_nan{false};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "quantize", [&] {
    using in_t = scalar_t;
    const in_t* in = x.const_data_ptr<in_t>();
    detail::visit_storage_type(out_type, [&](auto storage) {
      using out_t = decltype(storage);
      out_t* out = q.mutable_data_ptr<out_t>();
      at::parallel_for(0, x.numel(), kGrain, [&](int64_t begin, int64_t end) {
        for_each_channel_run(p, begin, end, [&](int64_t b, int64_t e, int64_t c) {
          const kernels::AffineQuantizer qz{p.scale[c], p.inv_scale[c], p.zero_point[c],
                                            static_cast<float>(quant_min),
                                            static_cast<float>(quant_max)};
          for (int64_t i = b; i < e; ++i) {
            const auto level = kernels::quant_level(in[i], qz);
            if (level != level) {
              saw_nan = true;
              return;
            }
            using acc = kernels::acc_t<in_t>;
            out[i] = static_cast<out_t>(kernels::clamp_keep_nan<acc>(
                level, static_cast<acc>(quant_min), static_cast<acc>(quant_max)));
          }
        });
      });
    });
  });
  TORCH_CHECK_VALUE(!saw_nan, op, ": input contains NaN, which has no integer representation");
  return q;
}

at::Tensor dequantize_cpu(const at::Tensor& input, const at::Tensor& scale,
                          const at::Tensor& zero_point, std::optional<int64_t> axis,
                          std::optional<at::ScalarType> dtype) {
  // Named references, not structured bindings: C++17 lambdas cannot capture those.
  const detail::DequantizeArgs args =
      detail::resolve_dequantize_args(input, scale, zero_point, axis, dtype);
  const at::Tensor& q = args.q;
  const QuantParams& p = args.params;
  const at::ScalarType out_type = args.out_type;
  at::Tensor x = at::empty_like(q, q.options().dtype(out_type));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out_type, "dequantize", [&] {
    using out_t = scalar_t;
    using acc = kernels::acc_t<out_t>;
    out_t* out = x.mutable_data_ptr<out_t>();
    detail::visit_storage_type(q.scalar_type(), [&](auto storage) {
      using in_t = decltype(storage);
      const in_t* in = q.const_data_ptr<in_t>();
      at::parallel_for(0, q.numel(), kGrain, [&](int64_t begin, int64_t end) {
        for_each_channel_run(p, begin, end, [&](int64_t b, int64_t e, int64_t c) {
          const acc zp = p.zero_point[c], s = p.scale[c];
          for (int64_t i = b; i < e; ++i)
            out[i] = static_cast<out_t>((static_cast<acc>(in[i]) - zp) * s);
        });
      });
    });
  });
  return x;
}

}  // namespace

TORCH_LIBRARY_IMPL(qext, CPU, m) {
  m.impl("quantize", quantize_cpu);
  m.impl("dequantize", dequantize_cpu);
}

}  // namespace qext::ops
