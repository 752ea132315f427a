// CPU kernels of the fake-quantization ops. The hot loops live in qext/kernels (AVX2 for float32
// when the CPU has it, the scalar reference otherwise); this file splits the tensor into rows of
// one quantizer and spreads them over threads.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "qext/kernels/fake_quantize_avx2.h"
#include "qext/kernels/fake_quantize_ref.h"
#include "qext/ops/common/quant_params.h"
#include "qext/ops/cpu/quantizer_rows.h"

namespace qext::ops {
namespace {

using detail::for_each_row;
using detail::QuantParams;
using kernels::QuantizerRow;
using kernels::Store;

// Threads split the tensor at multiples of kBlock elements, so no two threads share a mask byte.
constexpr int64_t kBlock = 64;
constexpr int64_t kGrainBlocks = 512;
// Outputs at least this large are written with non-temporal stores: they cannot stay in cache
// for their consumer anyway, and skipping the read-for-ownership saves a third of the traffic.
constexpr int64_t kStreamingBytes = int64_t{16} << 20;

Store store_for(const at::Tensor& out) {
  return out.numel() * static_cast<int64_t>(out.element_size()) >= kStreamingBytes
             ? Store::kStreaming
             : Store::kCached;
}

// Runs f(begin, end) over [0, numel) in parallel chunks aligned to kBlock.
template <typename F>
void parallel_blocks(int64_t numel, F&& f) {
  const int64_t blocks = (numel + kBlock - 1) / kBlock;
  at::parallel_for(0, blocks, kGrainBlocks,
                   [&](int64_t b0, int64_t b1) { f(b0 * kBlock, std::min(b1 * kBlock, numel)); });
}

// Row kernels: AVX2 for float32 where the CPU has it, the scalar reference otherwise.
template <typename T>
void fake_quantize_row(const T* x, T* y, int64_t n, const QuantizerRow& row, uint8_t* mask,
                       int64_t mask_bit0, Store) {
  kernels::fake_quantize_row_ref(x, y, n, row, mask, mask_bit0);
}

template <>
void fake_quantize_row<float>(const float* x, float* y, int64_t n, const QuantizerRow& row,
                              uint8_t* mask, int64_t mask_bit0, Store store) {
  if (kernels::cpu_has_avx2()) {
    kernels::fake_quantize_row_avx2(x, y, n, row, mask, mask_bit0, store);
  } else {
    kernels::fake_quantize_row_ref(x, y, n, row, mask, mask_bit0);
  }
}

template <typename T>
void masked_grad(const T* dy, const uint8_t* mask, T* dx, int64_t begin, int64_t end, Store) {
  kernels::masked_grad_ref(dy, mask, dx, begin, end);
}

template <>
void masked_grad<float>(const float* dy, const uint8_t* mask, float* dx, int64_t begin, int64_t end,
                        Store store) {
  if (kernels::cpu_has_avx2()) {
    kernels::masked_grad_avx2(dy, mask, dx, begin, end, store);
  } else {
    kernels::masked_grad_ref(dy, mask, dx, begin, end);
  }
}

template <typename T>
void learnable_grad_row(const T* x, const T* dy, T* dx, int64_t n, const QuantizerRow& row,
                        double* dscale_sum, double* dzp_sum, Store) {
  kernels::learnable_grad_row_ref(x, dy, dx, n, row, dscale_sum, dzp_sum);
}

template <>
void learnable_grad_row<float>(const float* x, const float* dy, float* dx, int64_t n,
                               const QuantizerRow& row, double* dscale_sum, double* dzp_sum,
                               Store store) {
  if (kernels::cpu_has_avx2()) {
    kernels::learnable_grad_row_avx2(x, dy, dx, n, row, dscale_sum, dzp_sum, store);
  } else {
    kernels::learnable_grad_row_ref(x, dy, dx, n, row, dscale_sum, dzp_sum);
  }
}

// y = fake_quantize(x) over the dense tensor x (y has its layout); mask, when given, pre-zeroed.
void fake_quantize_into(const at::Tensor& x, at::Tensor& y, uint8_t* mask, const QuantParams& p) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fake_quantize", [&] {
    const scalar_t* in = x.const_data_ptr<scalar_t>();
    scalar_t* out = y.mutable_data_ptr<scalar_t>();
    const Store store = store_for(y);
    parallel_blocks(x.numel(), [&](int64_t begin, int64_t end) {
      for_each_row(p, begin, end, [&](int64_t pos, int64_t len, const QuantizerRow& row) {
        fake_quantize_row(in + pos, out + pos, len, row, mask, pos, store);
      });
    });
  });
}

// Forward of fake_quantize (integer zero point) and fake_quantize_learnable (real zero point).
at::Tensor fake_quantize_forward(const at::Tensor& input, const at::Tensor& scale,
                                 const at::Tensor& zero_point, int64_t quant_min, int64_t quant_max,
                                 std::optional<int64_t> axis, detail::ZeroPointKind kind,
                                 const char* op) {
  const at::Tensor x = detail::as_dense(input);
  const QuantParams p =
      detail::resolve_quant_params(x, scale, zero_point, quant_min, quant_max, axis, kind, op);
  at::Tensor y = at::empty_like(x);
  fake_quantize_into(x, y, nullptr, p);
  return y;
}

at::Tensor fake_quantize_cpu(const at::Tensor& input, const at::Tensor& scale,
                             const at::Tensor& zero_point, int64_t quant_min, int64_t quant_max,
                             std::optional<int64_t> axis) {
  return fake_quantize_forward(input, scale, zero_point, quant_min, quant_max, axis,
                               detail::ZeroPointKind::kInteger, "fake_quantize");
}

std::tuple<at::Tensor, at::Tensor> fake_quantize_with_mask_cpu(const at::Tensor& input,
                                                               const at::Tensor& scale,
                                                               const at::Tensor& zero_point,
                                                               int64_t quant_min, int64_t quant_max,
                                                               std::optional<int64_t> axis) {
  const at::Tensor x = detail::as_dense(input);
  const QuantParams p =
      detail::resolve_quant_params(x, scale, zero_point, quant_min, quant_max, axis,
                                   detail::ZeroPointKind::kInteger, "fake_quantize");
  at::Tensor y = at::empty_like(x);
  at::Tensor mask = at::zeros({detail::packed_mask_bytes(x.numel())}, x.options().dtype(at::kByte));
  fake_quantize_into(x, y, mask.mutable_data_ptr<uint8_t>(), p);
  return {y, mask};
}

at::Tensor fake_quantize_mask_backward_cpu(const at::Tensor& grad, const at::Tensor& mask) {
  constexpr const char* op = "fake_quantize backward";
  detail::check_float_input(grad, op, "grad");
  TORCH_CHECK(grad.is_non_overlapping_and_dense(), op, ": grad must be dense");
  TORCH_CHECK(mask.scalar_type() == at::kByte && mask.dim() == 1 && mask.is_contiguous() &&
                  mask.numel() == detail::packed_mask_bytes(grad.numel()),
              op, ": mask must be a contiguous uint8 tensor of ",
              detail::packed_mask_bytes(grad.numel()), " bytes for ", grad.numel(),
              " elements, got ", mask.scalar_type(), " of shape ", mask.sizes());
  at::Tensor dx = at::empty_like(grad);
  const uint8_t* bits = mask.const_data_ptr<uint8_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(),
                                  "fake_quantize_backward", [&] {
                                    const scalar_t* dy = grad.const_data_ptr<scalar_t>();
                                    scalar_t* out = dx.mutable_data_ptr<scalar_t>();
                                    const Store store = store_for(dx);
                                    parallel_blocks(grad.numel(), [&](int64_t begin, int64_t end) {
                                      masked_grad(dy, bits, out, begin, end, store);
                                    });
                                  });
  return dx;
}

at::Tensor fake_quantize_learnable_cpu(const at::Tensor& input, const at::Tensor& scale,
                                       const at::Tensor& zero_point, int64_t quant_min,
                                       int64_t quant_max, double grad_factor,
                                       std::optional<int64_t> axis) {
  return fake_quantize_forward(input, scale, zero_point, quant_min, quant_max, axis,
                               detail::ZeroPointKind::kLearnable, "fake_quantize_learnable");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fake_quantize_learnable_backward_cpu(
    const at::Tensor& grad, const at::Tensor& input, const at::Tensor& scale,
    const at::Tensor& zero_point, int64_t quant_min, int64_t quant_max, double grad_factor,
    std::optional<int64_t> axis) {
  constexpr const char* op = "fake_quantize_learnable backward";
  const at::Tensor x = detail::as_dense(input);
  const QuantParams p = detail::resolve_quant_params(x, scale, zero_point, quant_min, quant_max,
                                                     axis, detail::ZeroPointKind::kLearnable, op);
  detail::check_float_input(grad, op, "grad");
  TORCH_CHECK(grad.sizes() == x.sizes() && grad.scalar_type() == x.scalar_type(), op,
              ": grad must match input in shape and dtype, got ", grad.sizes(), " ",
              grad.scalar_type(), " for input ", x.sizes(), " ", x.scalar_type());
  const at::Tensor dy = detail::align_to_layout(grad, x.sizes(), x.strides());
  at::Tensor dx = at::empty_like(x);

  // Per-thread sums per channel, reduced after the pass (no full-size temporaries).
  const int64_t channels = p.layout.channels;
  const int threads = at::get_num_threads();
  std::vector<double> dscale_parts(static_cast<size_t>(threads) * channels, 0.0);
  std::vector<double> dzp_parts(static_cast<size_t>(threads) * channels, 0.0);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "fake_quantize_learnable_backward", [&] {
        const scalar_t* in = x.const_data_ptr<scalar_t>();
        const scalar_t* g = dy.const_data_ptr<scalar_t>();
        scalar_t* out = dx.mutable_data_ptr<scalar_t>();
        const Store store = store_for(dx);
        parallel_blocks(x.numel(), [&](int64_t begin, int64_t end) {
          double* dscale_sum = dscale_parts.data() + at::get_thread_num() * channels;
          double* dzp_sum = dzp_parts.data() + at::get_thread_num() * channels;
          for_each_row(p, begin, end, [&](int64_t pos, int64_t len, const QuantizerRow& row) {
            const int64_t channel = row.scale - p.scale.data();
            learnable_grad_row(in + pos, g + pos, out + pos, len, row, dscale_sum + channel,
                               dzp_sum + channel, store);
          });
        });
      });

  at::Tensor dscale = at::empty({channels}, scale.options().dtype(at::kDouble));
  at::Tensor dzp = at::empty({channels}, scale.options().dtype(at::kDouble));
  double* dscale_out = dscale.mutable_data_ptr<double>();
  double* dzp_out = dzp.mutable_data_ptr<double>();
  for (int64_t c = 0; c < channels; ++c) {
    double s = 0.0, z = 0.0;
    for (int t = 0; t < threads; ++t) {
      s += dscale_parts[t * channels + c];
      z += dzp_parts[t * channels + c];
    }
    dscale_out[c] = s;
    dzp_out[c] = z;
  }
  auto [dscale_grad, dzp_grad] =
      detail::learnable_param_grads(dscale, dzp, scale, zero_point, grad_factor);
  return {dx, dscale_grad, dzp_grad};
}

}  // namespace

TORCH_LIBRARY_IMPL(qext, CPU, m) {
  m.impl("fake_quantize", fake_quantize_cpu);
  m.impl("_fake_quantize_with_mask", fake_quantize_with_mask_cpu);
  m.impl("_fake_quantize_mask_backward", fake_quantize_mask_backward_cpu);
  m.impl("fake_quantize_learnable", fake_quantize_learnable_cpu);
  m.impl("_fake_quantize_learnable_backward", fake_quantize_learnable_backward_cpu);
}

}  // namespace qext::ops
