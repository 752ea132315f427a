// CPU kernels of quantize / dequantize. The row loops live in qext/kernels (AVX2 for float32 when
// the CPU has it, the scalar reference otherwise); this file splits the tensor into rows of one
// quantizer and spreads them over threads.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <atomic>
#include <type_traits>

#include "qext/kernels/fake_quantize_avx2.h"
#include "qext/kernels/fake_quantize_ref.h"
#include "qext/ops/common/quant_params.h"
#include "qext/ops/cpu/quantizer_rows.h"

namespace qext::ops {
namespace {

using detail::for_each_row;
using detail::QuantParams;
using kernels::QuantizerRow;

constexpr int64_t kGrain = 32768;

// Row kernels: AVX2 for float32 where the CPU has it, the scalar reference otherwise.
template <typename T, typename Q>
bool quantize_row(const T* x, Q* q, int64_t n, const QuantizerRow& row) {
  if constexpr (std::is_same_v<T, float>) {
    if (kernels::cpu_has_avx2()) return kernels::quantize_row_avx2(x, q, n, row);
  }
  return kernels::quantize_row_ref(x, q, n, row);
}

template <typename Q, typename T>
void dequantize_row(const Q* q, T* x, int64_t n, const QuantizerRow& row) {
  if constexpr (std::is_same_v<T, float>) {
    if (kernels::cpu_has_avx2()) {
      kernels::dequantize_row_avx2(q, x, n, row);
      return;
    }
  }
  kernels::dequantize_row_ref(q, x, n, row);
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
    const scalar_t* in = x.const_data_ptr<scalar_t>();
    detail::visit_storage_type(out_type, [&](auto storage) {
      using out_t = decltype(storage);
      out_t* out = q.mutable_data_ptr<out_t>();
      at::parallel_for(0, x.numel(), kGrain, [&](int64_t begin, int64_t end) {
        for_each_row(p, begin, end, [&](int64_t pos, int64_t len, const QuantizerRow& row) {
          if (!quantize_row(in + pos, out + pos, len, row)) saw_nan = true;
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
    scalar_t* out = x.mutable_data_ptr<scalar_t>();
    detail::visit_storage_type(q.scalar_type(), [&](auto storage) {
      using in_t = decltype(storage);
      const in_t* in = q.const_data_ptr<in_t>();
      at::parallel_for(0, q.numel(), kGrain, [&](int64_t begin, int64_t end) {
        for_each_row(p, begin, end, [&](int64_t pos, int64_t len, const QuantizerRow& row) {
          dequantize_row(in + pos, out + pos, len, row);
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
