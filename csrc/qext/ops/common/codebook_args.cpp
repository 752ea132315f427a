#include "qext/ops/common/codebook_args.h"

#include <c10/util/Exception.h>
#include <c10/util/safe_numerics.h>

#include <limits>
#include <sstream>
#include <string>

#include "qext/kernels/packed_labels.h"
#include "qext/ops/common/quant_params.h"

namespace qext::ops::detail {
namespace {

constexpr const char* kDequantize = "qext::kmeans_dequantize";
constexpr const char* kCentroidGrad = "qext::_kmeans_centroid_grad";
constexpr const char* kPack = "qext::pack_labels";
constexpr const char* kUnpack = "qext::unpack_labels";
// So that numel * 8 + 7 (packed_labels_bytes) cannot overflow.
constexpr uint64_t kMaxLabels = (std::numeric_limits<int64_t>::max() - 7) / 8;

bool is_real_floating(at::ScalarType t) { return at::isFloatingType(t) && !at::isComplexType(t); }

void check_labels(const at::Tensor& labels, const char* op) {
  TORCH_CHECK_VALUE(labels.defined(), op, ": labels is an undefined tensor");
  const auto t = labels.scalar_type();
  TORCH_CHECK_TYPE(t == at::kByte || t == at::kInt || t == at::kLong, op,
                   ": labels must be a uint8, int32 or int64 tensor, got ", t);
}

void check_codebook_size(int64_t k, const char* op) {
  TORCH_CHECK_VALUE(k >= 1 && k <= kMaxCodebookSize, op,
                    ": the codebook size k must be in [1, 256], got ", k);
}

void check_label_bits(int64_t bits, const char* op) {
  TORCH_CHECK_VALUE(kernels::is_label_bits(bits), op, ": bits must be 1, 2, 4 or 8, got ", bits);
}

kernels::CodebookLayout layout_along(const at::Tensor& labels, int64_t k,
                                     std::optional<int64_t> axis) {
  kernels::CodebookLayout layout;
  layout.k = k;
  layout.inner = labels.numel();
  if (axis.has_value()) {
    const at::IntArrayRef sizes = labels.sizes();
    layout.outer = c10::multiply_integers(sizes.begin(), sizes.begin() + *axis);
    layout.codebooks = sizes[*axis];
    layout.inner = c10::multiply_integers(sizes.begin() + *axis + 1, sizes.end());
  }
  return layout;
}

// "[i0, i1, ...]": the index of row-major `offset` in a tensor of `sizes`.
std::string index_of(int64_t offset, at::IntArrayRef sizes) {
  std::vector<int64_t> index(sizes.size());
  for (int64_t d = static_cast<int64_t>(sizes.size()) - 1; d >= 0; --d) {
    index[d] = offset % sizes[d];
    offset /= sizes[d];
  }
  std::ostringstream out;
  out << at::IntArrayRef(index);
  return out.str();
}

int64_t label_at(const at::Tensor& labels, int64_t offset) {
  return labels.reshape(-1)[offset].item<int64_t>();
}

}  // namespace

kernels::CodebookLayout check_dequantize_args(const at::Tensor& centroids, const at::Tensor& labels,
                                              std::optional<int64_t> axis) {
  const char* op = kDequantize;
  TORCH_CHECK_VALUE(centroids.defined(), op, ": centroids is an undefined tensor");
  TORCH_CHECK_TYPE(is_real_floating(centroids.scalar_type()), op,
                   ": centroids must be a floating-point tensor (float32, float64, float16 or "
                   "bfloat16), got ",
                   centroids.scalar_type());
  check_labels(labels, op);
  TORCH_CHECK(centroids.device() == labels.device(), op,
              ": centroids and labels must be on the same device, got centroids on ",
              centroids.device(), " and labels on ", labels.device());
  const std::optional<int64_t> dim = normalize_axis(labels, axis, op);
  if (dim.has_value()) {
    TORCH_CHECK_VALUE(centroids.dim() == 2, op,
                      ": centroids must be two-dimensional [C, k] (one codebook per index along "
                      "axis ",
                      *axis, "), got shape ", centroids.sizes());
    TORCH_CHECK_VALUE(centroids.size(0) == labels.size(*dim), op, ": centroids has ",
                      centroids.size(0), " codebooks (shape ", centroids.sizes(),
                      ") but labels has ", labels.size(*dim), " entries along axis ", *axis,
                      " (shape ", labels.sizes(), ")");
  } else {
    TORCH_CHECK_VALUE(centroids.dim() == 1, op,
                      ": centroids must be one-dimensional [k] when axis is None, got shape ",
                      centroids.sizes());
  }
  check_codebook_size(centroids.size(-1), op);
  return layout_along(labels, centroids.size(-1), dim);
}

kernels::CodebookLayout check_centroid_grad_args(const at::Tensor& grad, const at::Tensor& labels,
                                                 int64_t k, std::optional<int64_t> axis) {
  const char* op = kCentroidGrad;
  TORCH_CHECK_VALUE(grad.defined(), op, ": grad is an undefined tensor");
  TORCH_CHECK_TYPE(is_real_floating(grad.scalar_type()), op,
                   ": grad must be a floating-point tensor, got ", grad.scalar_type());
  check_labels(labels, op);
  TORCH_CHECK(grad.device() == labels.device(), op,
              ": grad and labels must be on the same device, got grad on ", grad.device(),
              " and labels on ", labels.device());
  TORCH_CHECK_VALUE(grad.sizes() == labels.sizes(), op, ": grad must have the shape of labels ",
                    labels.sizes(), ", got ", grad.sizes());
  check_codebook_size(k, op);
  return layout_along(labels, k, normalize_axis(labels, axis, op));
}

std::vector<int64_t> centroid_grad_shape(const kernels::CodebookLayout& layout,
                                         std::optional<int64_t> axis) {
  if (axis.has_value()) return {layout.codebooks, layout.k};
  return {layout.k};
}

void throw_label_out_of_codebook(const at::Tensor& labels, int64_t offset, int64_t k,
                                 const char* op) {
  TORCH_CHECK_INDEX(false, op, ": labels must be in [0, k) for a codebook of k = ", k,
                    " centroids, got ", label_at(labels, offset), " at index ",
                    index_of(offset, labels.sizes()));
}

void check_pack_args(const at::Tensor& labels, int64_t bits) {
  check_labels(labels, kPack);
  check_label_bits(bits, kPack);
}

void throw_label_too_wide(const at::Tensor& labels, int64_t offset, int64_t bits) {
  TORCH_CHECK_VALUE(false, kPack, ": labels must be in [0, 2^bits) = [0, ", int64_t{1} << bits,
                    ") for bits = ", bits, ", got ", label_at(labels, offset), " at index ",
                    index_of(offset, labels.sizes()));
}

int64_t check_unpack_args(const at::Tensor& packed, int64_t bits, at::IntArrayRef shape) {
  const char* op = kUnpack;
  check_label_bits(bits, op);
  for (const int64_t d : shape) {
    TORCH_CHECK_VALUE(d >= 0, op, ": shape must not have negative dimensions, got ", shape);
  }
  uint64_t elements = 0;
  const bool overflow = c10::safe_multiplies_u64(shape, &elements);
  TORCH_CHECK_VALUE(!overflow && elements <= kMaxLabels, op, ": shape ", shape,
                    " has too many elements");
  const int64_t numel = static_cast<int64_t>(elements);
  TORCH_CHECK_VALUE(packed.defined(), op, ": packed is an undefined tensor");
  TORCH_CHECK_TYPE(packed.scalar_type() == at::kByte, op, ": packed must be a uint8 tensor, got ",
                   packed.scalar_type());
  TORCH_CHECK_VALUE(packed.dim() == 1, op, ": packed must be one-dimensional, got shape ",
                    packed.sizes());
  const int64_t bytes = kernels::packed_labels_bytes(numel, bits);
  TORCH_CHECK_VALUE(packed.numel() == bytes, op, ": packed has ", packed.numel(), " bytes, but ",
                    numel, " labels of shape ", shape, " at ", bits, " bits need ", bytes,
                    " bytes");
  return numel;
}

}  // namespace qext::ops::detail
