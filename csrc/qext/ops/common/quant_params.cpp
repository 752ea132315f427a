#include "qext/ops/common/quant_params.h"

#include <ATen/Dispatch_v2.h>
#include <ATen/ops/empty_strided.h>
#include <ATen/ops/mul.h>
#include <c10/util/Exception.h>

#include <cmath>

namespace qext::ops::detail {

namespace {

constexpr int64_t kLowestLevel = -(int64_t{1} << 16);
constexpr int64_t kHighestLevel = (int64_t{1} << 16) - 1;
constexpr int64_t kMaxLevels = int64_t{1} << 16;

bool is_real_floating(at::ScalarType t) { return at::isFloatingType(t) && !at::isComplexType(t); }

bool is_integer(at::ScalarType t) { return at::isIntegralType(t, /*includeBool=*/false); }

// Reads a parameter tensor (at most one-dimensional) into host doubles (exact for every accepted
// dtype). CPU tensors are read in place: a converted copy costs more than the whole op on small
// inputs.
std::vector<double> read_host(const at::Tensor& t) {
  if (!t.is_cpu()) return read_host(t.to(at::kCPU));
  std::vector<double> values(t.numel());
  const int64_t stride = t.dim() == 0 ? 1 : t.stride(0);
  AT_DISPATCH_V2(t.scalar_type(), "read_host", AT_WRAP([&] {
                   const scalar_t* data = t.const_data_ptr<scalar_t>();
                   for (size_t i = 0; i < values.size(); ++i)
                     values[i] = static_cast<double>(data[static_cast<int64_t>(i) * stride]);
                 }),
                 AT_EXPAND(AT_INTEGRAL_TYPES_V2), AT_EXPAND(AT_FLOATING_TYPES), at::kHalf,
                 at::kBFloat16);
  return values;
}

// Channel c of p from its scale and zero point (the range already in p), validated; `several`:
// name the channel in the errors.
void set_channel(QuantParams* p, size_t c, double scale, double zero_point, bool several,
                 ZeroPointKind kind, const char* op) {
  const float s = static_cast<float>(scale);
  const float inv = 1.0f / s;
  TORCH_CHECK_VALUE(std::isfinite(s) && s > 0.0f && std::isfinite(inv), op,
                    ": scale must be finite and positive (and representable in float32 with a "
                    "finite reciprocal), got ",
                    scale, several ? " for channel " : "", several ? std::to_string(c) : "");
  p->scale[c] = s;
  p->inv_scale[c] = inv;
  double z = zero_point;
  if (kind == ZeroPointKind::kLearnable) {
    TORCH_CHECK_VALUE(std::isfinite(z), op, ": zero_point must be finite, got ", z,
                      several ? " for channel " : "", several ? std::to_string(c) : "");
    z = std::min(std::max(std::nearbyint(z), static_cast<double>(p->quant_min)),
                 static_cast<double>(p->quant_max));
  }
  TORCH_CHECK_VALUE(z >= p->quant_min && z <= p->quant_max, op, ": zero_point must lie in ",
                    kind == ZeroPointKind::kStorage ? "the range of the input's integer dtype "
                                                    : "[quant_min, quant_max] = ",
                    "[", p->quant_min, ", ", p->quant_max, "], got ", z,
                    several ? " for channel " : "", several ? std::to_string(c) : "");
  p->zero_point[c] = static_cast<float>(z);
}

}  // namespace

void check_quant_range(int64_t quant_min, int64_t quant_max, const char* op) {
  TORCH_CHECK_VALUE(quant_min < quant_max, op,
                    ": quant_min must be less than quant_max, got quant_min=", quant_min,
                    " and quant_max=", quant_max);
  TORCH_CHECK_VALUE(quant_min >= kLowestLevel && quant_max <= kHighestLevel, op,
                    ": quant_min and quant_max must lie in [", kLowestLevel, ", ", kHighestLevel,
                    "], got quant_min=", quant_min, " and quant_max=", quant_max);
  TORCH_CHECK_VALUE(
      quant_max - quant_min < kMaxLevels, op,
      ": the range [quant_min, quant_max] may hold at most 2^16 levels (16 bits), got [", quant_min,
      ", ", quant_max, "] (", quant_max - quant_min + 1, " levels)");
}

void check_float_input(const at::Tensor& input, const char* op, const char* name) {
  TORCH_CHECK(input.defined(), op, ": ", name, " is an undefined tensor");
  TORCH_CHECK(is_real_floating(input.scalar_type()), op, ": ", name,
              " must be a floating-point tensor (float32, float64, float16 or bfloat16), got ",
              input.scalar_type());
}

std::optional<int64_t> normalize_axis(const at::Tensor& input, std::optional<int64_t> axis,
                                      const char* op) {
  if (!axis.has_value()) return std::nullopt;
  const int64_t dim = input.dim();
  TORCH_CHECK_INDEX(*axis >= -dim && *axis < dim && dim > 0, op, ": axis ", *axis,
                    " is out of range for an input with ", dim, " dimensions (shape ",
                    input.sizes(), ")");
  return *axis < 0 ? *axis + dim : *axis;
}

ChannelLayout channel_layout(const at::Tensor& dense_input, std::optional<int64_t> axis) {
  ChannelLayout layout;
  if (!axis.has_value() || dense_input.size(*axis) <= 1) return layout;
  layout.channels = dense_input.size(*axis);
  // In a dense tensor the stride of the channel axis is the size of everything faster than it.
  layout.inner = std::max<int64_t>(dense_input.stride(*axis), 1);
  layout.outer = dense_input.numel() / (layout.channels * layout.inner);
  return layout;
}

std::optional<int64_t> check_quant_signature(const at::Tensor& input, const at::Tensor& scale,
                                             const at::Tensor& zero_point, int64_t quant_min,
                                             int64_t quant_max, std::optional<int64_t> axis,
                                             ZeroPointKind kind, const char* op) {
  if (kind != ZeroPointKind::kStorage) {
    check_float_input(input, op);
    check_quant_range(quant_min, quant_max, op);
  }
  TORCH_CHECK(scale.defined() && zero_point.defined(), op,
              ": scale and zero_point must be defined tensors");
  TORCH_CHECK(is_real_floating(scale.scalar_type()), op,
              ": scale must be a floating-point tensor, got ", scale.scalar_type());
  if (kind != ZeroPointKind::kLearnable) {
    TORCH_CHECK(is_integer(zero_point.scalar_type()), op,
                ": zero_point must be an integer tensor (int32 or int64), got ",
                zero_point.scalar_type());
  } else {
    TORCH_CHECK(is_integer(zero_point.scalar_type()) || is_real_floating(zero_point.scalar_type()),
                op, ": zero_point must be a real tensor, got ", zero_point.scalar_type());
  }
  TORCH_CHECK(scale.device() == input.device() && zero_point.device() == input.device(), op,
              ": input, scale and zero_point must be on the same device, got input on ",
              input.device(), ", scale on ", scale.device(), " and zero_point on ",
              zero_point.device());
  TORCH_CHECK_VALUE(scale.dim() <= 1 && scale.numel() >= 1, op,
                    ": scale must be a scalar or a one-dimensional tensor with at least one "
                    "element, got shape ",
                    scale.sizes());
  TORCH_CHECK_VALUE(zero_point.numel() == scale.numel() && zero_point.dim() <= 1, op,
                    ": zero_point must have the shape of scale ", scale.sizes(), ", got ",
                    zero_point.sizes());

  const std::optional<int64_t> normalised = normalize_axis(input, axis, op);
  if (scale.numel() == 1) return std::nullopt;  // one scale: per-tensor, whatever the axis
  TORCH_CHECK_VALUE(normalised.has_value(), op, ": scale has ", scale.numel(),
                    " elements (per-channel) but no axis was given");
  TORCH_CHECK_VALUE(scale.numel() == input.size(*normalised), op, ": scale and zero_point have ",
                    scale.numel(), " elements but input has ", input.size(*normalised),
                    " channels along axis ", *normalised, " (shape ", input.sizes(), ")");
  return normalised;
}

QuantParams resolve_quant_params(const at::Tensor& dense_input, const at::Tensor& scale,
                                 const at::Tensor& zero_point, int64_t quant_min, int64_t quant_max,
                                 std::optional<int64_t> axis, ZeroPointKind kind, const char* op) {
  QuantParams p;
  p.quant_min = quant_min;
  p.quant_max = quant_max;
  p.axis =
      check_quant_signature(dense_input, scale, zero_point, quant_min, quant_max, axis, kind, op);
  p.layout = channel_layout(dense_input, p.axis);

  const std::vector<double> scales = read_host(scale);
  const std::vector<double> zero_points = read_host(zero_point);
  const size_t n = scales.size();
  p.scale.resize(n);
  p.inv_scale.resize(n);
  p.zero_point.resize(n);
  for (size_t c = 0; c < n; ++c) set_channel(&p, c, scales[c], zero_points[c], n > 1, kind, op);
  return p;
}

QuantParams per_tensor_params(const at::Tensor& dense_input, double scale, double zero_point,
                              int64_t quant_min, int64_t quant_max, ZeroPointKind kind,
                              const char* op) {
  if (kind != ZeroPointKind::kStorage) {
    check_float_input(dense_input, op);
    check_quant_range(quant_min, quant_max, op);
  }
  QuantParams p;
  p.quant_min = quant_min;
  p.quant_max = quant_max;
  p.scale.resize(1);
  p.inv_scale.resize(1);
  p.zero_point.resize(1);
  set_channel(&p, 0, scale, zero_point, false, kind, op);
  return p;
}

at::Tensor as_dense(const at::Tensor& input) {
  return input.is_non_overlapping_and_dense() ? input : input.contiguous();
}

at::Tensor align_to_layout(const at::Tensor& grad, at::IntArrayRef sizes, at::IntArrayRef strides) {
  if (grad.strides() == strides && grad.is_non_overlapping_and_dense()) return grad;
  return at::empty_strided(sizes, strides, grad.options()).copy_(grad);
}

std::pair<int64_t, int64_t> storage_range(at::ScalarType dtype, const char* op) {
  switch (dtype) {
    case at::kChar:
      return {-128, 127};
    case at::kByte:
      return {0, 255};
    case at::kInt:
      return {kLowestLevel, kHighestLevel};
    default:
      TORCH_CHECK(false, op, ": integer storage must be int8, uint8 or int32, got ", dtype);
  }
}

at::ScalarType quantized_storage_type(int64_t quant_min, int64_t quant_max,
                                      std::optional<at::ScalarType> requested, const char* op) {
  if (requested.has_value()) {
    const auto [lo, hi] = storage_range(*requested, op);
    TORCH_CHECK_VALUE(quant_min >= lo && quant_max <= hi, op, ": dtype ", *requested,
                      " cannot hold the range [", quant_min, ", ", quant_max, "]");
    return *requested;
  }
  if (quant_min >= 0 && quant_max <= 255) return at::kByte;
  if (quant_min >= -128 && quant_max <= 127) return at::kChar;
  return at::kInt;
}

DequantizeArgs resolve_dequantize_args(const at::Tensor& input, const at::Tensor& scale,
                                       const at::Tensor& zero_point, std::optional<int64_t> axis,
                                       std::optional<at::ScalarType> dtype) {
  constexpr const char* op = "dequantize";
  TORCH_CHECK(input.defined(), op, ": input is an undefined tensor");
  const auto [lo, hi] = storage_range(input.scalar_type(), op);
  const at::ScalarType out_type = dtype.value_or(at::kFloat);
  TORCH_CHECK(is_real_floating(out_type), op, ": dtype must be a floating-point type, got ",
              out_type);
  at::Tensor q = as_dense(input);
  QuantParams params =
      resolve_quant_params(q, scale, zero_point, lo, hi, axis, ZeroPointKind::kStorage, op);
  return {std::move(q), std::move(params), out_type};
}

at::ScalarType zero_point_grad_dtype(const at::Tensor& zero_point, const at::Tensor& scale) {
  return at::isFloatingType(zero_point.scalar_type()) ? zero_point.scalar_type()
                                                      : scale.scalar_type();
}

std::tuple<at::Tensor, at::Tensor> learnable_param_grads(const at::Tensor& dscale_sums,
                                                         const at::Tensor& dzp_sums,
                                                         const at::Tensor& scale,
                                                         const at::Tensor& zero_point,
                                                         double grad_factor) {
  return {at::mul(dscale_sums, grad_factor).to(scale.scalar_type()).reshape(scale.sizes()),
          at::mul(dzp_sums, grad_factor)
              .to(zero_point_grad_dtype(zero_point, scale))
              .reshape(zero_point.sizes())};
}

int64_t packed_mask_bytes(int64_t numel) { return (numel + 31) / 32 * 4; }

}  // namespace qext::ops::detail
