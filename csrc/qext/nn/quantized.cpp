#include "qext/nn/quantized.h"

#include <torch/torch.h>

#include <cmath>
#include <utility>

#include "qext/ops/quantize.h"
#include "qext/ops/quantized_layers.h"

namespace qext::nn {
namespace quantized {

namespace {

// Bits needed to store the levels of [lo, hi] (Python's _utils.range_bits).
int64_t range_bits(int64_t lo, int64_t hi) {
  int64_t bits = 1;
  while ((int64_t{1} << bits) < hi - lo + 1) ++bits;
  return bits;
}

// The quantized dtype that carries levels of [lo, hi] and its integer storage.
std::pair<at::ScalarType, at::ScalarType> qtensor_dtype(int64_t lo, int64_t hi) {
  if (lo >= 0 && hi <= 255) return {at::kQUInt8, at::kByte};
  if (lo >= -128 && hi <= 127) return {at::kQInt8, at::kChar};
  return {at::kQInt32, at::kInt};
}

bool is_8bit(const torch::Tensor& x) {
  return x.is_quantized() && (x.scalar_type() == at::kQUInt8 || x.scalar_type() == at::kQInt8);
}

// Wraps integer levels in [lo, hi] as a per-tensor affine quantized tensor.
torch::Tensor make_qtensor(const torch::Tensor& q, const torch::Tensor& scale,
                           const torch::Tensor& zero_point, int64_t lo, int64_t hi) {
  return at::_make_per_tensor_quantized_tensor(q.to(qtensor_dtype(lo, hi).second),
                                               scale.item<float>(), zero_point.item<int32_t>());
}

// float32 (q - z) * s of a quantized tensor, exactly as the fake-quant ops compute it; other
// tensors unchanged (Python's _utils.dequantize_any).
torch::Tensor dequantize_any(const torch::Tensor& x) {
  if (!x.is_quantized()) return x;
  TORCH_CHECK_VALUE(x.qscheme() == at::kPerTensorAffine || x.qscheme() == at::kPerTensorSymmetric,
                    "qext::nn::quantized: expected a per-tensor quantized tensor, got qscheme ",
                    toString(x.qscheme()));
  if (x.is_cpu()) return ops::dequantize_per_tensor(x);
  const torch::Tensor q = x.int_repr();
  return ops::dequantize(q, torch::full({1}, x.q_scale(), q.options().dtype(torch::kFloat)),
                         torch::full({1}, x.q_zero_point(), q.options().dtype(torch::kInt)));
}

// Registers t as buffer `name` when defined (Python registers None, which no state dict lists).
torch::Tensor maybe_register(torch::nn::Module& m, const std::string& name,
                             const torch::Tensor& t) {
  return t.defined() ? m.register_buffer(name, t) : t;
}

}  // namespace

// --- output quantization ------------------------------------------------------------------------

void QuantizedModule::init_output(const std::optional<QParams>& output) {
  if (!output.has_value()) return;
  TORCH_CHECK_VALUE(output->scale.defined() && output->zero_point.defined() &&
                        output->scale.numel() == 1 && output->zero_point.numel() == 1,
                    "qext::nn::quantized: output scale and zero_point must have one element "
                    "(activations are quantized per tensor), got ",
                    output->scale.defined() ? output->scale.numel() : 0, " and ",
                    output->zero_point.defined() ? output->zero_point.numel() : 0);
  TORCH_CHECK_VALUE(output->quant_min < output->quant_max, "qext::nn::quantized: output range [",
                    output->quant_min, ", ", output->quant_max, "] is empty");
  scale = register_buffer("scale", output->scale.detach().to(torch::kFloat).reshape({1}).clone());
  zero_point = register_buffer("zero_point",
                               output->zero_point.detach().to(torch::kInt).reshape({1}).clone());
  out_quant_min = output->quant_min;
  out_quant_max = output->quant_max;
}

bool QuantizedModule::output_is_8bit() const {
  return output_quantized() && range_bits(out_quant_min, out_quant_max) <= 8;
}

torch::Tensor QuantizedModule::finish(const torch::Tensor& y) const {
  if (!output_quantized()) return y;
  if (y.is_cpu()) {
    return ops::quantize_per_tensor(y.to(torch::kFloat), scale.item<float>(),
                                    zero_point.item<int32_t>(), out_quant_min, out_quant_max);
  }
  const torch::Tensor q =
      ops::quantize(y.to(torch::kFloat), scale, zero_point, out_quant_min, out_quant_max);
  return make_qtensor(q, scale, zero_point, out_quant_min, out_quant_max);
}

QuantizeImpl::QuantizeImpl(const std::optional<QParams>& output) { init_output(output); }

torch::Tensor QuantizeImpl::forward(const torch::Tensor& x) { return finish(dequantize_any(x)); }

torch::Tensor DeQuantizeImpl::forward(const torch::Tensor& x) { return dequantize_any(x); }

QAddImpl::QAddImpl(const std::optional<QParams>& output) { init_output(output); }

torch::Tensor QAddImpl::forward(const torch::Tensor& x, const torch::Tensor& y) {
  if (output_is_8bit() && is_8bit(x) && is_8bit(y)) {
    return ops::quantized_add(x, y, scale.item<float>(), zero_point.item<int32_t>(), out_quant_min,
                              out_quant_max);
  }
  return reference_forward(x, y);
}

torch::Tensor QAddImpl::reference_forward(const torch::Tensor& x, const torch::Tensor& y) const {
  return finish(dequantize_any(x) + dequantize_any(y));
}

// --- Linear / Conv2d ----------------------------------------------------------------------------

void WeightedModule::init_weight(const torch::Tensor& w, const torch::Tensor& b,
                                 const std::optional<QParams>& wq, bool fused_relu) {
  relu = fused_relu;
  const torch::Tensor wd = w.detach();
  if (!wq.has_value()) {
    weight = register_buffer("weight", wd.to(torch::kFloat).clone());
  } else {
    const torch::Tensor s = wq->scale.detach().to(torch::kFloat).reshape({-1}).clone();
    const torch::Tensor z = wq->zero_point.detach().to(torch::kInt).reshape({-1}).clone();
    const std::optional<int64_t> axis = s.numel() > 1 ? wq->axis : std::nullopt;
    TORCH_CHECK_VALUE(!axis.has_value() || *axis == 0,
                      "qext::nn::quantized: weights must be quantized per output channel (axis 0) "
                      "or per tensor, got axis ",
                      *axis);
    const auto dtype = wq->quant_min >= -128 && wq->quant_max <= 127 ? torch::kChar : torch::kInt;
    weight = register_buffer("weight", ops::quantize(wd.to(torch::kFloat), s, z, wq->quant_min,
                                                     wq->quant_max, axis, dtype));
    weight_scale = register_buffer("weight_scale", s);
    weight_zero_point = register_buffer("weight_zero_point", z);
    weight_quant_min = wq->quant_min;
    weight_quant_max = wq->quant_max;
    weight_axis = axis;
  }
  bias = maybe_register(*this, "bias", b.defined() ? b.detach().to(torch::kFloat).clone() : b);
}

void WeightedModule::repack() {
  // The kernels take 8-bit symmetric weights and an 8-bit or float output.
  const bool fits = weight_quantized() && weight.scalar_type() == torch::kChar &&
                    (weight_zero_point == 0).all().item<bool>() &&
                    (!output_quantized() || output_is_8bit());
  if (!fits) return;
  auto [packed, sums] = ops::pack_quantized_weight(weight.cpu(), groups());
  packed = packed.to(weight.device());
  sums = sums.to(weight.device());
  if (packed_weight.defined()) {
    packed_weight.set_data(packed);
    row_sums.set_data(sums);
  } else {
    packed_weight = register_buffer("packed_weight", packed);
    row_sums = register_buffer("row_sums", sums);
  }
}

torch::Tensor WeightedModule::dequantized_weight() const {
  if (!weight_quantized()) return weight;
  return ops::dequantize(weight, weight_scale, weight_zero_point, weight_axis);
}

std::optional<double> WeightedModule::kernel_output_scale() const {
  return output_quantized() ? std::optional<double>(scale.item<float>()) : std::nullopt;
}

torch::Tensor WeightedModule::forward(const torch::Tensor& x) {
  if (packed_weight.defined() && is_8bit(x)) return kernel_forward(x);
  return reference_forward(x);
}

torch::Tensor WeightedModule::reference_forward(const torch::Tensor& x) const {
  if (x.is_quantized() && weight_quantized()) {
    const double s_x = x.q_scale();
    const torch::Tensor xc =
        x.int_repr().to(torch::kDouble) - static_cast<double>(x.q_zero_point());
    std::vector<int64_t> shape(weight.dim(), 1);
    shape[0] = -1;
    const torch::Tensor wc =
        weight.to(torch::kDouble) - weight_zero_point.to(torch::kDouble).reshape(shape);
    torch::Tensor acc = apply(xc, wc, {});  // exact integers in float64
    const torch::Tensor w_scale = weight_scale.expand({weight.size(0)}).to(torch::kDouble);
    if (bias.defined()) {
      // The bias in accumulator units; float outputs add its int32 rounding, as the kernels.
      const torch::Tensor b = bias.to(torch::kDouble) / (s_x * w_scale);
      acc = acc + channel_view(output_quantized() ? b : torch::round(b));
    }
    const torch::Tensor acc_scale = s_x * w_scale;
    if (!output_quantized()) {
      torch::Tensor y = acc * channel_view(acc_scale);
      if (relu) y = torch::relu(y);
      return y.to(torch::kFloat);
    }
    const int64_t z_out = zero_point.item<int32_t>();
    const torch::Tensor mult = channel_view(acc_scale / static_cast<double>(scale.item<float>()));
    torch::Tensor level = torch::round(acc * mult) + static_cast<double>(z_out);
    if (relu) level = torch::clamp_min(level, static_cast<double>(z_out));
    level =
        torch::clamp(level, static_cast<double>(out_quant_min), static_cast<double>(out_quant_max));
    return make_qtensor(level, scale, zero_point, out_quant_min, out_quant_max);
  }
  const torch::Tensor xf = dequantize_any(x);
  torch::Tensor y = apply(xf, dequantized_weight().to(xf.scalar_type()),
                          bias.defined() ? bias.to(xf.scalar_type()) : bias);
  if (relu) y = torch::relu(y);
  return finish(y);
}

LinearImpl::LinearImpl(const torch::Tensor& w, const torch::Tensor& b,
                       const std::optional<QParams>& weight_qparams,
                       const std::optional<QParams>& output, bool fused_relu) {
  TORCH_CHECK_VALUE(w.dim() == 2, "qext::nn::quantized::Linear: weight must be [out, in], got ",
                    w.sizes());
  init_weight(w, b, weight_qparams, fused_relu);
  init_output(output);
  repack();
}

torch::Tensor LinearImpl::apply(const torch::Tensor& x, const torch::Tensor& w,
                                const torch::Tensor& b) const {
  return torch::linear(x, w, b);
}

torch::Tensor LinearImpl::kernel_forward(const torch::Tensor& x) const {
  return ops::quantized_linear(
      x, packed_weight, row_sums, weight.sizes(), weight_scale,
      bias.defined() ? std::optional<torch::Tensor>(bias) : std::nullopt, kernel_output_scale(),
      output_quantized() ? zero_point.item<int32_t>() : 0, out_quant_min, out_quant_max, relu);
}

Conv2dImpl::Conv2dImpl(const torch::Tensor& w, const torch::Tensor& b,
                       const std::optional<QParams>& weight_qparams,
                       const std::optional<QParams>& output, Conv2dGeometry geom, bool fused_relu)
    : geometry(geom) {
  TORCH_CHECK_VALUE(w.dim() == 4,
                    "qext::nn::quantized::Conv2d: weight must be [out, in / groups, "
                    "kh, kw], got ",
                    w.sizes());
  TORCH_CHECK_VALUE(geometry.groups >= 1 && w.size(0) % geometry.groups == 0,
                    "qext::nn::quantized::Conv2d: groups=", geometry.groups,
                    " must divide out_channels=", w.size(0));
  init_weight(w, b, weight_qparams, fused_relu);
  init_output(output);
  repack();
}

torch::Tensor Conv2dImpl::apply(const torch::Tensor& x, const torch::Tensor& w,
                                const torch::Tensor& b) const {
  // Zero padding of (q_x - z_x) is padding q_x with its zero point: exact in the integer path.
  return torch::conv2d(x, w, b, *geometry.stride, *geometry.padding, *geometry.dilation,
                       geometry.groups);
}

torch::Tensor Conv2dImpl::kernel_forward(const torch::Tensor& x) const {
  const int64_t out = weight.size(0);
  const bool depthwise =
      geometry.groups > 1 && geometry.groups == out && weight.size(1) == 1;  // groups == in == out
  // The depthwise kernel requantizes; float outputs take the reference path (as Python).
  if (depthwise && !output_quantized()) return reference_forward(x);
  return ops::quantized_conv2d(
      x, packed_weight, row_sums, weight.sizes(), weight_scale,
      bias.defined() ? std::optional<torch::Tensor>(bias) : std::nullopt, *geometry.stride,
      *geometry.padding, *geometry.dilation, geometry.groups, kernel_output_scale(),
      output_quantized() ? zero_point.item<int32_t>() : 0, out_quant_min, out_quant_max, relu);
}

}  // namespace quantized

// --- conversion
// -----------------------------------------------------------------------------------

namespace {

std::string describe(const char* type, const std::string& name) {
  return name.empty() ? std::string(type) : std::string(type) + " '" + name + "'";
}

// Output parameters of a QAT module's activation quantizer (none: float output).
std::optional<quantized::QParams> output_qparams(const FakeQuantize& fq, const std::string& who) {
  if (!fq) return std::nullopt;
  const QuantSpec& spec = fq->spec();
  TORCH_CHECK_VALUE(!spec.axis.has_value(), "qext::nn::convert: ", who,
                    " quantizes its output per channel (axis ", spec.axis.value_or(0),
                    "); converted activations are per tensor");
  TORCH_CHECK_VALUE(fq->has_data(), "qext::nn::convert: the output quantizer of ", who,
                    " saw no data (",
                    spec.learnable ? "learnable scale not initialised" : "observer empty",
                    "); run calibration batches or training steps through the QAT model first");
  try {
    auto [s, z] = fq->calculate_qparams();
    return quantized::QParams{s, z, spec.quant_min(), spec.quant_max(), std::nullopt};
  } catch (const c10::Error& e) {
    TORCH_CHECK_VALUE(false, "qext::nn::convert: the output quantizer of ", who, ": ",
                      e.what_without_backtrace());
  }
}

// Weight parameters: the quantizer sees the weights it quantizes once more, as in Python's
// convert (on copies of its state).
std::optional<quantized::QParams> weight_qparams(const FakeQuantize& fq, const torch::Tensor& w,
                                                 const std::string& who) {
  if (!fq) return std::nullopt;
  const QuantSpec& spec = fq->spec();
  try {
    auto [s, z] = fq->calculate_qparams(w);
    return quantized::QParams{s, z, spec.quant_min(), spec.quant_max(), spec.axis};
  } catch (const c10::Error& e) {
    TORCH_CHECK_VALUE(false, "qext::nn::convert: the weight quantizer of ", who, ": ",
                      e.what_without_backtrace());
  }
}

quantized::Conv2d convert_conv(const torch::Tensor& w, const torch::Tensor& b,
                               const FakeQuantize& weight_fq, const FakeQuantize& output_fq,
                               const QConv2dOptions& c, const std::string& who) {
  auto wq = weight_qparams(weight_fq, w, who);
  auto out = output_qparams(output_fq, who);
  quantized::Conv2d conv(
      w, b, wq, out, quantized::Conv2dGeometry{c.stride, c.padding, c.dilation, c.groups}, c.relu);
  conv->eval();
  return conv;
}

torch::Tensor detached(const torch::Tensor& t) { return t.defined() ? t.detach() : t; }

}  // namespace

quantized::Linear convert(const QLinear& qat, const std::string& name) {
  const torch::NoGradGuard no_grad;
  const std::string who = describe(qat->options.relu ? "QLinear(relu)" : "QLinear", name);
  const torch::Tensor w = qat->weight.detach();
  auto wq = weight_qparams(qat->weight_fake_quant, w, who);
  auto out = output_qparams(qat->activation_post_process, who);
  quantized::Linear linear(w, detached(qat->bias), wq, out, qat->options.relu);
  linear->eval();
  return linear;
}

quantized::Conv2d convert(const QConv2d& qat, const std::string& name) {
  const torch::NoGradGuard no_grad;
  return convert_conv(qat->weight.detach(), detached(qat->bias), qat->weight_fake_quant,
                      qat->activation_post_process, qat->options,
                      describe(qat->options.relu ? "QConv2d(relu)" : "QConv2d", name));
}

quantized::Conv2d convert(const ConvBn2d& qat, const std::string& name) {
  const torch::NoGradGuard no_grad;
  auto [w, b] = qat->folded_weight_bias();
  return convert_conv(w, b, qat->weight_fake_quant, qat->activation_post_process, qat->options.conv,
                      describe(qat->options.conv.relu ? "ConvBnReLU2d" : "ConvBn2d", name));
}

quantized::Quantize convert(const QuantStub& qat, const std::string& name) {
  const torch::NoGradGuard no_grad;
  quantized::Quantize quant(
      output_qparams(qat->activation_post_process, describe("QuantStub", name)));
  quant->eval();
  return quant;
}

quantized::QAdd convert(const QAdd& qat, const std::string& name) {
  const torch::NoGradGuard no_grad;
  quantized::QAdd add(output_qparams(qat->activation_post_process, describe("QAdd", name)));
  add->eval();
  return add;
}

}  // namespace qext::nn
