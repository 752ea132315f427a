// CPU kernels of quantize / dequantize. The row loops live in qext/kernels (AVX2 for float32 when
// the CPU has it, the scalar reference otherwise); this file splits the tensor into rows of one
// quantizer and spreads them over threads.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/_empty_affine_quantized.h>
#include <ATen/ops/empty.h>
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

// q (storage out_type, x's layout) = the levels of the dense floating tensor x, on all threads.
void quantize_into(const at::Tensor& x, const QuantParams& p, at::ScalarType out_type, void* q,
                   const char* op) {
  std::atomic<bool> saw_nan{false};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "quantize", [&] {
    const scalar_t* in = x.const_data_ptr<scalar_t>();
    detail::visit_storage_type(out_type, [&](auto storage) {
      using out_t = decltype(storage);
      out_t* out = static_cast<out_t*>(q);
      at::parallel_for(0, x.numel(), kGrain, [&](int64_t begin, int64_t end) {
        for_each_row(p, begin, end, [&](int64_t pos, int64_t len, const QuantizerRow& row) {
          if (!quantize_row(in + pos, out + pos, len, row)) saw_nan = true;
        });
      });
    });
  });
  TORCH_CHECK_VALUE(!saw_nan, op, ": input contains NaN, which has no integer representation");
}

// x (floating, q's layout) = the values of the dense levels q (storage storage_type).
void dequantize_into(const void* q, at::ScalarType storage_type, const QuantParams& p,
                     at::Tensor& x) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dequantize", [&] {
    scalar_t* out = x.mutable_data_ptr<scalar_t>();
    detail::visit_storage_type(storage_type, [&](auto storage) {
      using in_t = decltype(storage);
      const in_t* in = static_cast<const in_t*>(q);
      at::parallel_for(0, x.numel(), kGrain, [&](int64_t begin, int64_t end) {
        for_each_row(p, begin, end, [&](int64_t pos, int64_t len, const QuantizerRow& row) {
          dequantize_row(in + pos, out + pos, len, row);
        });
      });
    });
  });
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
  quantize_into(x, p, out_type, q.mutable_data_ptr(), op);
  return q;
}

at::Tensor dequantize_cpu(const at::Tensor& input, const at::Tensor& scale,
                          const at::Tensor& zero_point, std::optional<int64_t> axis,
                          std::optional<at::ScalarType> dtype) {
  const detail::DequantizeArgs args =
      detail::resolve_dequantize_args(input, scale, zero_point, axis, dtype);
  at::Tensor x = at::empty_like(args.q, args.q.options().dtype(args.out_type));
  dequantize_into(args.q.const_data_ptr(), args.q.scalar_type(), args.params, x);
  return x;
}

// The integer storage of a quantized dtype: quint8 -> uint8, qint8 -> int8, qint32 -> int32.
at::ScalarType qtensor_storage_type(at::ScalarType qtype) {
  switch (qtype) {
    case at::kQUInt8:
      return at::kByte;
    case at::kQInt8:
      return at::kChar;
    case at::kQInt32:
      return at::kInt;
    default:
      TORCH_CHECK(false, "dequantize_per_tensor: input must be quint8, qint8 or qint32, got ",
                  qtype);
  }
}

// The quantized dtype of an integer storage (quantized_storage_type's uint8, int8 or int32).
at::ScalarType qtensor_type(at::ScalarType storage_type) {
  return storage_type == at::kByte   ? at::kQUInt8
         : storage_type == at::kChar ? at::kQInt8
                                     : at::kQInt32;
}

// The layout a quantized tensor made from `input` keeps: channels-last when input is, else
// contiguous (quantized tensors have no other dense layouts).
at::MemoryFormat qtensor_format(const at::Tensor& input) {
  return input.dim() == 4 && input.is_contiguous(at::MemoryFormat::ChannelsLast) &&
                 !input.is_contiguous()
             ? at::MemoryFormat::ChannelsLast
             : at::MemoryFormat::Contiguous;
}

at::Tensor quantize_per_tensor_cpu(const at::Tensor& input, double scale, int64_t zero_point,
                                   int64_t quant_min, int64_t quant_max) {
  constexpr const char* op = "quantize_per_tensor";
  const QuantParams p =
      detail::per_tensor_params(input, scale, static_cast<double>(zero_point), quant_min, quant_max,
                                detail::ZeroPointKind::kInteger, op);
  const at::MemoryFormat format = qtensor_format(input);
  const at::Tensor x = input.contiguous(format);
  const at::ScalarType storage_type =
      detail::quantized_storage_type(quant_min, quant_max, std::nullopt, op);
  // The qtensor's scale is the float32 one the levels were computed with, as qext.quantize's.
  at::Tensor q = at::_empty_affine_quantized(
      x.sizes(), x.options().dtype(qtensor_type(storage_type)), p.scale[0], zero_point, format);
  quantize_into(x, p, storage_type, q.data_ptr(), op);
  return q;
}

at::Tensor dequantize_per_tensor_cpu(const at::Tensor& input) {
  constexpr const char* op = "dequantize_per_tensor";
  TORCH_CHECK(input.defined() && input.is_quantized(), op,
              ": input must be a quantized tensor, got ",
              input.defined() ? c10::toString(input.scalar_type()) : "an undefined tensor");
  TORCH_CHECK(input.qscheme() == at::kPerTensorAffine || input.qscheme() == at::kPerTensorSymmetric,
              op, ": input must be quantized per tensor, got qscheme ",
              c10::toString(input.qscheme()));
  const at::ScalarType storage_type = qtensor_storage_type(input.scalar_type());
  const auto [lo, hi] = detail::storage_range(storage_type, op);
  const QuantParams p =
      detail::per_tensor_params(input, input.q_scale(), static_cast<double>(input.q_zero_point()),
                                lo, hi, detail::ZeroPointKind::kStorage, op);
  const at::MemoryFormat format = qtensor_format(input);
  const at::Tensor q = input.contiguous(format);
  at::Tensor x = at::empty(q.sizes(), q.options().dtype(at::kFloat), format);
  dequantize_into(q.data_ptr(), storage_type, p, x);
  return x;
}

}  // namespace

TORCH_LIBRARY_IMPL(qext, CPU, m) {
  m.impl("quantize", quantize_cpu);
  m.impl("dequantize", dequantize_cpu);
  m.impl("quantize_per_tensor", quantize_per_tensor_cpu);
  m.impl("dequantize_per_tensor",
         dequantize_per_tensor_cpu);  // its clear error for unquantized input
}

TORCH_LIBRARY_IMPL(qext, QuantizedCPU, m) {
  m.impl("dequantize_per_tensor", dequantize_per_tensor_cpu);
}

}  // namespace qext::ops
