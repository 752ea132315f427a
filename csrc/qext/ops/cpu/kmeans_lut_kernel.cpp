// CPU kernels of the look-up-table ops (ops/kmeans_lut.h): the shared argument checks, a label
// range pass when the codebook has fewer than 2^bits entries, then the kernels of
// kernels/kmeans_lut.h (AVX-512 or AVX2 where the CPU has it, the scalar reference otherwise) over
// the output channels in parallel. Each output is computed whole by one thread in the fixed order,
// so the result does not depend on the thread count.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>

#include "qext/kernels/fake_quantize_avx2.h"
#include "qext/kernels/kmeans_lut.h"
#include "qext/ops/common/kmeans_lut_args.h"

namespace qext::ops {
namespace {

namespace k = qext::kernels;
using detail::LutWeightArgs;

// The fastest kernels this CPU runs: AVX-512, AVX2 or the scalar reference (all bit-identical).
struct CpuPath {
  decltype(&k::lut_decode_rows_ref) decode;
  decltype(&k::lut_linear_ref) linear;
};

const CpuPath& cpu_path() {
  static const CpuPath path =
      k::lut_cpu_has_avx512() ? CpuPath{k::lut_decode_rows_avx512, k::lut_linear_avx512}
      : k::cpu_has_avx2()     ? CpuPath{k::lut_decode_rows_avx2, k::lut_linear_avx2}
                              : CpuPath{k::lut_decode_rows_ref, k::lut_linear_ref};
  return path;
}

// Multiply-adds (or decoded weights) per parallel task, at least.
constexpr int64_t kGrainWork = int64_t{1} << 15;

int64_t grain_rows(int64_t work_per_row) {
  return std::max<int64_t>(1, kGrainWork / std::max<int64_t>(1, work_per_row));
}

// The kernels index the codebook with the labels as they are: a label >= k is an error.
void check_labels(const LutWeightArgs& w, const char* op) {
  if (!w.labels_can_exceed_k()) return;
  const uint8_t* p = w.labels.data_ptr<uint8_t>();
  const int top = at::parallel_reduce(
      0, w.numel(), kGrainWork * 8, 0,
      [&](int64_t begin, int64_t end, int acc) {
        return std::max(acc, k::cpu_has_avx2() ? k::max_label_avx2(p, begin, end, w.bits)
                                               : k::max_label_ref(p, begin, end, w.bits));
      },
      [](int a, int b) { return std::max(a, b); });
  if (top >= w.k) detail::throw_label_out_of_range(w.labels, w, op);
}

at::Tensor kmeans_linear_cpu(const at::Tensor& input, const at::Tensor& packed_labels,
                             const at::Tensor& centroids, int64_t bits,
                             at::IntArrayRef weight_shape, const std::optional<at::Tensor>& bias) {
  constexpr const char* op = "qext::kmeans_linear";
  const detail::LutLinearCall call =
      detail::check_lut_linear(input, packed_labels, centroids, bits, weight_shape, bias, op);
  const LutWeightArgs& w = call.w;
  check_labels(w, op);
  at::Tensor y = at::empty(call.out_sizes, call.x.options());
  if (call.rows == 0) return y;
  const k::LutWeight lw = w.view();
  const int64_t M = call.rows;
  const float* x_p = call.x.data_ptr<float>();
  const float* b_p = call.bias.defined() ? call.bias.data_ptr<float>() : nullptr;
  float* y_p = y.data_ptr<float>();
  const auto linear = cpu_path().linear;
  at::parallel_for(0, w.rows, grain_rows(M * w.cols), [&](int64_t n0, int64_t n1) {
    linear(lw, M, x_p, w.cols, b_p, n0, n1, y_p, w.rows);
  });
  return y;
}

at::Tensor kmeans_decode_cpu(const at::Tensor& packed_labels, const at::Tensor& centroids,
                             int64_t bits, at::IntArrayRef weight_shape) {
  constexpr const char* op = "qext::kmeans_decode";
  const LutWeightArgs w = detail::check_lut_weight(packed_labels, centroids, bits, weight_shape,
                                                   /*dims=*/0, op);
  check_labels(w, op);
  at::Tensor out = at::empty(weight_shape, w.centroids.options());
  const k::LutWeight lw = w.view();
  float* out_p = out.data_ptr<float>();
  const auto decode = cpu_path().decode;
  at::parallel_for(0, w.rows, grain_rows(w.cols), [&](int64_t r0, int64_t r1) {
    decode(lw, r0, r1, out_p + r0 * w.cols, w.cols);
  });
  return out;
}

at::Tensor kmeans_linear_reference_cpu(const at::Tensor& input, const at::Tensor& weight,
                                       const std::optional<at::Tensor>& bias) {
  constexpr const char* op = "qext::_kmeans_linear_reference";
  TORCH_CHECK_TYPE(weight.scalar_type() == at::kFloat, op, ": weight must be float32, got ",
                   weight.scalar_type());
  TORCH_CHECK_VALUE(weight.dim() == 2 && weight.size(0) > 0 && weight.size(1) > 0, op,
                    ": weight must be [N, K] with N, K > 0, got shape ", weight.sizes());
  const int64_t N = weight.size(0), K = weight.size(1);
  const auto sizes = detail::check_linear_input(input, bias, N, K, weight.device(), op);
  const at::Tensor x = input.contiguous();
  const at::Tensor w = weight.contiguous();
  const at::Tensor b = bias.has_value() && bias->defined() ? bias->contiguous() : at::Tensor();
  at::Tensor y = at::empty(sizes, x.options());
  const int64_t M = x.numel() / K;
  if (M == 0) return y;
  const float* x_p = x.data_ptr<float>();
  const float* w_p = w.data_ptr<float>();
  const float* b_p = b.defined() ? b.data_ptr<float>() : nullptr;
  float* y_p = y.data_ptr<float>();
  at::parallel_for(0, N, grain_rows(M * K), [&](int64_t n0, int64_t n1) {
    k::linear_ref(M, n1 - n0, K, x_p, K, w_p + n0 * K, K, b_p != nullptr ? b_p + n0 : nullptr,
                  y_p + n0, N);
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(qext, CPU, m) {
  m.impl("kmeans_linear", kmeans_linear_cpu);
  m.impl("kmeans_decode", kmeans_decode_cpu);
  m.impl("_kmeans_linear_reference", kmeans_linear_reference_cpu);
}

}  // namespace qext::ops
