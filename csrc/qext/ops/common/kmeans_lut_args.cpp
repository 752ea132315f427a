#include "qext/ops/common/kmeans_lut_args.h"

#include <c10/util/Exception.h>

namespace qext::ops::detail {

kernels::LutWeight LutWeightArgs::view() const {
  return {
      labels.data_ptr<uint8_t>(), bits, centroids.data_ptr<float>(), k, per_channel, rows, cols};
}

LutWeightArgs check_lut_weight(const at::Tensor& packed_labels, const at::Tensor& centroids,
                               int64_t bits, at::IntArrayRef weight_shape, int64_t dims,
                               const char* op) {
  TORCH_CHECK_VALUE(kernels::is_label_bits(bits), op, ": bits must be 1, 2, 4 or 8, got ", bits);
  if (dims > 0) {
    TORCH_CHECK_VALUE(static_cast<int64_t>(weight_shape.size()) == dims, op, ": weight_shape must ",
                      "have ", dims, " sizes, got ", weight_shape);
  } else {
    TORCH_CHECK_VALUE(!weight_shape.empty(), op, ": weight_shape must have at least one size, got ",
                      weight_shape);
  }
  // numel * 8 must fit int64 (the bit position of the last label).
  constexpr int64_t kMaxNumel = int64_t{1} << 56;
  int64_t numel = 1;
  for (size_t d = 0; d < weight_shape.size(); ++d) {
    TORCH_CHECK_VALUE(weight_shape[d] > 0, op, ": weight_shape must have positive sizes, got ",
                      weight_shape, " (size ", d, " is ", weight_shape[d], ")");
    TORCH_CHECK_VALUE(numel <= kMaxNumel / weight_shape[d], op, ": weight_shape ", weight_shape,
                      " has more than 2^56 elements");
    numel *= weight_shape[d];
  }
  TORCH_CHECK(packed_labels.defined() && centroids.defined(), op,
              ": packed_labels and centroids must be defined tensors");
  TORCH_CHECK_TYPE(packed_labels.scalar_type() == at::kByte, op,
                   ": packed_labels must be uint8, got ", packed_labels.scalar_type());
  TORCH_CHECK_VALUE(packed_labels.dim() == 1, op, ": packed_labels must be 1-D, got shape ",
                    packed_labels.sizes());
  const int64_t bytes = kernels::packed_labels_bytes(numel, bits);
  TORCH_CHECK_VALUE(packed_labels.numel() == bytes, op, ": packed_labels has ",
                    packed_labels.numel(), " bytes, but weight_shape ", weight_shape, " at ", bits,
                    " bits needs ceil(", numel, " * ", bits, " / 8) = ", bytes);
  TORCH_CHECK_TYPE(centroids.scalar_type() == at::kFloat, op, ": centroids must be float32, got ",
                   centroids.scalar_type());
  const int64_t rows = weight_shape[0];
  TORCH_CHECK_VALUE(centroids.dim() == 1 || (centroids.dim() == 2 && centroids.size(0) == rows), op,
                    ": centroids must be [k] (one codebook) or [", rows,
                    ", k] (one per output channel), got shape ", centroids.sizes());
  const int64_t k = centroids.size(-1);
  TORCH_CHECK_VALUE(k >= 1 && k <= (int64_t{1} << bits), op, ": centroids has k = ", k,
                    " entries per codebook, but ", bits, "-bit labels address 1 to ",
                    int64_t{1} << bits);
  TORCH_CHECK(centroids.device() == packed_labels.device(), op, ": centroids is on ",
              centroids.device(), " but packed_labels is on ", packed_labels.device());
  LutWeightArgs w;
  w.bits = static_cast<int>(bits);
  w.rows = rows;
  w.cols = numel / rows;
  w.k = k;
  w.per_channel = centroids.dim() == 2;
  w.labels = packed_labels.contiguous();
  w.centroids = centroids.contiguous();
  return w;
}

std::vector<int64_t> check_linear_input(const at::Tensor& input,
                                        const std::optional<at::Tensor>& bias, int64_t N, int64_t K,
                                        at::Device device, const char* op) {
  TORCH_CHECK(input.defined(), op, ": input must be a defined tensor");
  TORCH_CHECK_TYPE(input.scalar_type() == at::kFloat, op, ": input must be float32, got ",
                   input.scalar_type());
  TORCH_CHECK(input.device() == device, op, ": input is on ", input.device(),
              " but the weight is on ", device);
  TORCH_CHECK_VALUE(input.dim() >= 1 && input.size(-1) == K, op, ": input of shape ", input.sizes(),
                    " does not end in the weight's K = ", K);
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK_TYPE(bias->scalar_type() == at::kFloat, op, ": bias must be float32, got ",
                     bias->scalar_type());
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == N, op, ": bias must have shape [", N,
                      "], got ", bias->sizes());
    TORCH_CHECK(bias->device() == device, op, ": bias is on ", bias->device(),
                " but the weight is on ", device);
  }
  std::vector<int64_t> sizes(input.sizes().begin(), input.sizes().end());
  sizes.back() = N;
  return sizes;
}

LutLinearCall check_lut_linear(const at::Tensor& input, const at::Tensor& packed_labels,
                               const at::Tensor& centroids, int64_t bits,
                               at::IntArrayRef weight_shape, const std::optional<at::Tensor>& bias,
                               const char* op) {
  LutLinearCall call;
  call.w = check_lut_weight(packed_labels, centroids, bits, weight_shape, /*dims=*/2, op);
  call.out_sizes =
      check_linear_input(input, bias, call.w.rows, call.w.cols, packed_labels.device(), op);
  call.x = input.contiguous();
  if (bias.has_value() && bias->defined()) call.bias = bias->contiguous();
  call.rows = call.x.numel() / call.w.cols;
  return call;
}

void throw_label_out_of_range(const at::Tensor& cpu_labels, const LutWeightArgs& w,
                              const char* op) {
  const uint8_t* p = cpu_labels.data_ptr<uint8_t>();
  const int64_t i = kernels::find_label_at_least(p, 0, w.numel(), w.bits, w.k);
  TORCH_INTERNAL_ASSERT(i >= 0, op, ": no label >= k to report");
  TORCH_CHECK_INDEX(false, op, ": packed_labels holds label ",
                    kernels::read_packed_label(p, i, w.bits), " at element ", i, " (row ",
                    i / w.cols, ", column ", i % w.cols, "), but centroids has only k = ", w.k,
                    " entries (labels must be < k)");
}

}  // namespace qext::ops::detail
