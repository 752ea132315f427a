#include "qext/nn/modules.h"

#include <torch/nn/functional/activation.h>
#include <torch/nn/init.h>
#include <torch/torch.h>

#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "qext/ops/fake_quantize_learnable.h"
#include "qext/ops/fake_quantize_observe.h"
#include "qext/ops/observe.h"

namespace qext::nn {

namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();
// Smallest learnable scale the forward uses (Python's _EPS, torch.finfo(float32).eps).
constexpr float kEps = std::numeric_limits<float>::epsilon();

// Python's nn.Linear / nn.Conv2d initialisation: kaiming_uniform(a=sqrt(5)) weights, bias uniform
// in +-1/sqrt(fan_in).
void reset_parameters(torch::Tensor& weight, torch::Tensor& bias, int64_t fan_in) {
  const torch::NoGradGuard no_grad;
  torch::nn::init::kaiming_uniform_(weight, std::sqrt(5.0));
  if (bias.defined()) {
    const double bound = fan_in > 0 ? 1.0 / std::sqrt(static_cast<double>(fan_in)) : 0.0;
    torch::nn::init::uniform_(bias, -bound, bound);
  }
}

FakeQuantize make_fake_quantize(const std::optional<QuantSpec>& spec) {
  return spec.has_value() ? FakeQuantize(*spec) : FakeQuantize(nullptr);
}

torch::Tensor maybe_fake_quantize(FakeQuantize& fq, const torch::Tensor& x) {
  return fq ? fq->forward(x) : x;
}

std::optional<double> averaging_constant(const QuantSpec& spec) {
  return spec.observer == ObserverKind::kMovingAverage
             ? std::optional<double>(spec.averaging_constant)
             : std::nullopt;
}

// Zero point of a symmetric range: 0 when signed, the middle level when unsigned (torch.ao's).
int64_t symmetric_zero_point(const QuantSpec& spec) {
  return spec.quant_min() >= 0 ? (spec.quant_min() + spec.quant_max() + 1) / 2 : 0;
}

// Fresh observer statistics (+inf / -inf: nothing seen) for `channels` channels.
std::pair<torch::Tensor, torch::Tensor> fresh_range(int64_t channels,
                                                    const torch::TensorOptions& options) {
  return {torch::full({channels}, kInf, options), torch::full({channels}, -kInf, options)};
}

// Folds x into the statistics lo / hi (sized for x) and returns choose_qparams of the result, as
// the observer + calculate_qparams of a forward pass do (one fused op, the output discarded).
std::pair<torch::Tensor, torch::Tensor> observe_range(const QuantSpec& spec, const torch::Tensor& x,
                                                      torch::Tensor& lo, torch::Tensor& hi) {
  torch::Tensor s = torch::ones(lo.sizes(), lo.options());
  torch::Tensor z = torch::zeros(lo.sizes(), lo.options().dtype(torch::kInt));
  ops::fake_quantize_observe(x, lo, hi, s, z, averaging_constant(spec), spec.quant_min(),
                             spec.quant_max(), spec.symmetric, spec.axis, /*observe=*/true);
  return {s, z};
}

// choose_qparams of an observed range, refusing channels that saw no finite value.
std::pair<torch::Tensor, torch::Tensor> range_qparams(const QuantSpec& spec,
                                                      const torch::Tensor& lo,
                                                      const torch::Tensor& hi) {
  const torch::Tensor bad = (~(torch::isfinite(lo) & torch::isfinite(hi))).nonzero();
  // Also the state of a quantizer that ran with its observer disabled (the buffers are sized
  // for the fake quantization but hold no statistics).
  TORCH_CHECK_VALUE(bad.numel() == 0, "FakeQuantize: no finite values observed",
                    spec.axis.has_value()
                        ? " in channel " + std::to_string(bad[0][0].item<int64_t>())
                        : std::string(),
                    " (its inputs were all NaN/Inf, or it ran only with the observer disabled)");
  auto [scale, zero_point] =
      ops::choose_qparams(lo, hi, spec.quant_min(), spec.quant_max(), spec.symmetric);
  return {scale, zero_point};
}

// LSQ initial scale 2 mean(|x|) / sqrt(quant_max) over the finite values of x, per tensor ([1]) or
// per channel along axis (Python's FakeQuantize._lsq_init_scale, the same reductions).
torch::Tensor lsq_init_scale(const torch::Tensor& x, std::optional<int64_t> axis,
                             int64_t quant_max) {
  torch::Tensor a = x.abs();
  const torch::Tensor finite = torch::isfinite(a);
  a = torch::where(finite, a, torch::zeros({}, a.options()));
  torch::Tensor total, count;
  if (!axis.has_value()) {
    total = a.sum(torch::kDouble).reshape({1});
    count = finite.sum().reshape({1});
  } else {
    const int64_t ax = *axis < 0 ? *axis + x.dim() : *axis;
    std::vector<int64_t> dims;
    for (int64_t d = 0; d < x.dim(); ++d) {
      if (d != ax) dims.push_back(d);
    }
    total = dims.empty() ? a.to(torch::kDouble) : a.sum(dims, false, torch::kDouble);
    count = dims.empty() ? finite.to(torch::kLong) : finite.sum(dims);
  }
  const torch::Tensor empty = (count == 0).nonzero();
  TORCH_CHECK_VALUE(empty.numel() == 0, "FakeQuantize: no finite values observed (all NaN/Inf)",
                    axis.has_value() ? " in channel " + std::to_string(empty[0][0].item<int64_t>())
                                     : std::string(),
                    "; cannot initialise the learnable scale");
  const torch::Tensor mean = total / count.to(torch::kDouble);
  return (2.0 * mean / std::sqrt(static_cast<double>(std::max<int64_t>(quant_max, 1))))
      .to(torch::kFloat);
}

// The learnable quantizer's first (scale, float zero point) from the batch x: LSQ's mean-|x|
// scale when symmetric; LSQ+ folds x into the observer statistics lo / hi (sized for x) and
// takes their qparams.
std::pair<torch::Tensor, torch::Tensor> learnable_init(const QuantSpec& spec,
                                                       const torch::Tensor& x, torch::Tensor& lo,
                                                       torch::Tensor& hi) {
  torch::Tensor s, zp;
  if (spec.symmetric) {
    s = lsq_init_scale(x, spec.axis, spec.quant_max());
    zp = torch::full_like(s, static_cast<double>(symmetric_zero_point(spec)));
  } else {
    auto [scale, zero_point] = observe_range(spec, x, lo, hi);
    s = scale;
    zp = zero_point.to(torch::kFloat);
  }
  return {s.clamp_min(kEps), zp};
}

// Learnable parameters as the integer model uses them: max(scale, eps) and the zero point
// rounded half to even, clamped to the range, int32.
std::pair<torch::Tensor, torch::Tensor> learnable_qparams(const QuantSpec& spec,
                                                          const torch::Tensor& scale,
                                                          const torch::Tensor& zero_point) {
  const torch::NoGradGuard no_grad;
  return {scale.detach().to(torch::kFloat).clamp_min(kEps).clone(),
          torch::round(zero_point.detach().to(torch::kDouble))
              .clamp(spec.quant_min(), spec.quant_max())
              .to(torch::kInt)};
}

}  // namespace

ObserverImpl::ObserverImpl() {
  min_val = register_buffer("min_val", torch::empty({0}));
  max_val = register_buffer("max_val", torch::empty({0}));
}

FakeQuantizeImpl::FakeQuantizeImpl(QuantSpec spec) : spec_(spec) {
  spec_.validate();
  const int64_t zp = spec_.symmetric ? symmetric_zero_point(spec_) : 0;
  if (spec_.learnable) {
    // Python's learnable FakeQuantize: float zero point, trained only when affine (LSQ+).
    scale = register_parameter("scale", torch::ones({1}));
    const torch::Tensor zp0 = torch::full({1}, static_cast<double>(zp));
    zero_point = spec_.symmetric ? register_buffer("zero_point", zp0)
                                 : register_parameter("zero_point", zp0);
    initialized = register_buffer("initialized", torch::zeros({1}, torch::kUInt8));
  } else {
    scale = register_buffer("scale", torch::ones({1}));
    zero_point = register_buffer("zero_point", torch::full({1}, zp, torch::kInt));
  }
  fake_quant_enabled = register_buffer("fake_quant_enabled", torch::ones({1}, torch::kUInt8));
  observer_enabled = register_buffer("observer_enabled", torch::ones({1}, torch::kUInt8));
  observer = register_module("observer", Observer());
}

void FakeQuantizeImpl::enable_observer(bool enabled) { observer_enabled.fill_(enabled ? 1 : 0); }

void FakeQuantizeImpl::enable_fake_quant(bool enabled) {
  fake_quant_enabled.fill_(enabled ? 1 : 0);
}

bool FakeQuantizeImpl::has_data() const {
  return spec_.learnable ? initialized.item<uint8_t>() != 0 : observer->min_val.numel() > 0;
}

int64_t FakeQuantizeImpl::channels_of(const torch::Tensor& x) const {
  const int64_t channels = spec_.axis.has_value() ? x.size(*spec_.axis) : 1;
  const int64_t seen = observer->min_val.numel();
  TORCH_CHECK_VALUE(seen == 0 || seen == channels, "FakeQuantize: observed ", seen,
                    " channels before, got an input with ", channels, " along axis ",
                    spec_.axis.value_or(-1));
  return channels;
}

std::pair<torch::Tensor, torch::Tensor> FakeQuantizeImpl::observer_range(
    const torch::Tensor& x) const {
  const int64_t channels = channels_of(x);
  if (observer->min_val.numel() == channels) {
    return {observer->min_val.clone(), observer->max_val.clone()};
  }
  return fresh_range(channels, x.options().dtype(torch::kFloat));
}

void FakeQuantizeImpl::ensure_state(const torch::Tensor& x) {
  const int64_t channels = channels_of(x);
  if (observer->min_val.numel() == channels) return;
  const torch::NoGradGuard no_grad;
  const auto options = x.options().dtype(torch::kFloat);
  auto [lo, hi] = fresh_range(channels, options);
  // Module::buffers hold the same TensorImpl: set_ keeps the registration pointing at the data.
  observer->min_val.set_(lo);
  observer->max_val.set_(hi);
  if (spec_.learnable) return;  // its parameters are sized by the initialisation
  scale.set_(scale.expand({channels}).to(options).clone());
  zero_point.set_(zero_point.expand({channels}).to(x.device()).clone());
}

torch::Tensor FakeQuantizeImpl::forward(const torch::Tensor& x) {
  const bool observe = observer_enabled.item<uint8_t>() != 0;
  const bool quantize = fake_quant_enabled.item<uint8_t>() != 0;
  if (!observe && !quantize) return x;
  if (spec_.learnable) return forward_learnable(x, observe, quantize);
  ensure_state(x);
  torch::Tensor y = ops::fake_quantize_observe(
      x, observer->min_val, observer->max_val, scale, zero_point, averaging_constant(spec_),
      spec_.quant_min(), spec_.quant_max(), spec_.symmetric, spec_.axis, observe);
  return quantize ? y : x;
}

torch::Tensor FakeQuantizeImpl::forward_learnable(const torch::Tensor& x, bool observe,
                                                  bool quantize) {
  if (observe && x.numel() > 0 && initialized.item<uint8_t>() == 0) {
    const torch::NoGradGuard no_grad;
    if (!spec_.symmetric) ensure_state(x);  // LSQ+ initialises from the observer
    auto [s, zp] = learnable_init(spec_, x.detach(), observer->min_val, observer->max_val);
    // set_data keeps the registered parameters (and an optimizer holding them) in place while
    // per-channel ones grow to the channel count, as Python's `.data =`.
    scale.set_data(s);
    zero_point.set_data(zp);
    initialized.fill_(1);
  }
  if (!quantize) return x;
  // Value max(scale, eps), gradient straight through to scale.
  const torch::Tensor s = scale + (scale.clamp_min(kEps) - scale).detach();
  const double per_scale =
      static_cast<double>(x.numel()) / static_cast<double>(std::max<int64_t>(scale.numel(), 1));
  const double grad_factor =
      1.0 / std::sqrt(std::max(per_scale, 1.0) *
                      static_cast<double>(std::max<int64_t>(spec_.quant_max(), 1)));
  return ops::fake_quantize_learnable(x, s, zero_point, spec_.quant_min(), spec_.quant_max(),
                                      grad_factor, spec_.axis);
}

std::pair<torch::Tensor, torch::Tensor> FakeQuantizeImpl::calculate_qparams() const {
  const torch::NoGradGuard no_grad;
  if (spec_.learnable) {
    TORCH_CHECK_VALUE(has_data(),
                      "FakeQuantize: the learnable scale was never initialised (no "
                      "data was seen with the observer enabled)");
    return learnable_qparams(spec_, scale, zero_point);
  }
  TORCH_CHECK_VALUE(has_data(), "FakeQuantize: the observer saw no data");
  const torch::Tensor lo = observer->min_val, hi = observer->max_val;
  return range_qparams(spec_, lo, hi);
}

std::pair<torch::Tensor, torch::Tensor> FakeQuantizeImpl::calculate_qparams(
    const torch::Tensor& x) const {
  const bool observe = observer_enabled.item<uint8_t>() != 0 && x.numel() > 0;
  if (!observe || (spec_.learnable && has_data())) return calculate_qparams();
  const torch::NoGradGuard no_grad;
  auto [lo, hi] = observer_range(x);  // copies: the module stays as it is
  if (spec_.learnable) {
    auto [s, zp] = learnable_init(spec_, x.detach(), lo, hi);
    return learnable_qparams(spec_, s, zp);
  }
  observe_range(spec_, x.detach(), lo, hi);
  return range_qparams(spec_, lo, hi);
}

QLinearImpl::QLinearImpl(QLinearOptions opts) : options(opts) {
  weight = register_parameter("weight", torch::empty({options.out_features, options.in_features}));
  if (options.bias) bias = register_parameter("bias", torch::empty({options.out_features}));
  reset_parameters(weight, bias, options.in_features);
  weight_fake_quant = make_fake_quantize(options.qconfig.weight);
  activation_post_process = make_fake_quantize(options.qconfig.activation);
  if (weight_fake_quant) register_module("weight_fake_quant", weight_fake_quant);
  if (activation_post_process) register_module("activation_post_process", activation_post_process);
}

torch::Tensor QLinearImpl::forward(const torch::Tensor& x) {
  torch::Tensor y = torch::linear(x, maybe_fake_quantize(weight_fake_quant, weight), bias);
  if (options.relu) y = torch::relu(y);
  return maybe_fake_quantize(activation_post_process, y);
}

QConv2dImpl::QConv2dImpl(QConv2dOptions opts) : options(opts) {
  TORCH_CHECK_VALUE(options.groups >= 1 && options.in_channels % options.groups == 0 &&
                        options.out_channels % options.groups == 0,
                    "QConv2d: groups=", options.groups,
                    " must divide in_channels=", options.in_channels,
                    " and out_channels=", options.out_channels);
  const int64_t k = options.kernel_size;
  weight = register_parameter(
      "weight", torch::empty({options.out_channels, options.in_channels / options.groups, k, k}));
  if (options.bias) bias = register_parameter("bias", torch::empty({options.out_channels}));
  reset_parameters(weight, bias, options.in_channels / options.groups * k * k);
  weight_fake_quant = make_fake_quantize(options.qconfig.weight);
  activation_post_process = make_fake_quantize(options.qconfig.activation);
  if (weight_fake_quant) register_module("weight_fake_quant", weight_fake_quant);
  if (activation_post_process) register_module("activation_post_process", activation_post_process);
}

torch::Tensor QConv2dImpl::forward(const torch::Tensor& x) {
  torch::Tensor y =
      torch::conv2d(x, maybe_fake_quantize(weight_fake_quant, weight), bias, options.stride,
                    options.padding, options.dilation, options.groups);
  if (options.relu) y = torch::relu(y);
  return maybe_fake_quantize(activation_post_process, y);
}

ConvBn2dImpl::ConvBn2dImpl(ConvBn2dOptions opts) : options(opts) {
  const QConv2dOptions& c = options.conv;
  TORCH_CHECK_VALUE(
      c.groups >= 1 && c.in_channels % c.groups == 0 && c.out_channels % c.groups == 0,
      "ConvBn2d: groups=", c.groups, " must divide in_channels=", c.in_channels,
      " and out_channels=", c.out_channels);
  const int64_t k = c.kernel_size;
  weight =
      register_parameter("weight", torch::empty({c.out_channels, c.in_channels / c.groups, k, k}));
  if (c.bias) bias = register_parameter("bias", torch::empty({c.out_channels}));
  reset_parameters(weight, bias, c.in_channels / c.groups * k * k);
  bn = register_module("bn", torch::nn::BatchNorm2d(torch::nn::BatchNorm2dOptions(c.out_channels)
                                                        .eps(options.eps)
                                                        .momentum(options.momentum)));
  step = register_buffer("step", torch::zeros({}, torch::kLong));
  weight_fake_quant = make_fake_quantize(c.qconfig.weight);
  activation_post_process = make_fake_quantize(c.qconfig.activation);
  if (weight_fake_quant) register_module("weight_fake_quant", weight_fake_quant);
  if (activation_post_process) register_module("activation_post_process", activation_post_process);
}

torch::Tensor ConvBn2dImpl::conv(const torch::Tensor& x, const torch::Tensor& w,
                                 const torch::Tensor& b) const {
  const QConv2dOptions& c = options.conv;
  return torch::conv2d(x, w, b, c.stride, c.padding, c.dilation, c.groups);
}

std::pair<torch::Tensor, torch::Tensor> ConvBn2dImpl::folded_weight_bias() const {
  const torch::Tensor factor = bn->weight / torch::sqrt(bn->running_var + options.eps);
  const torch::Tensor w_fold = weight * factor.reshape({-1, 1, 1, 1});
  const torch::Tensor b = bias.defined() ? bias : torch::zeros_like(bn->running_mean);
  return {w_fold, bn->bias + (b - bn->running_mean) * factor};
}

torch::Tensor ConvBn2dImpl::forward(const torch::Tensor& x) {
  bool frozen = !is_training();
  if (is_training()) {
    frozen = bn_frozen_ || (options.freeze_bn_step.has_value() &&
                            step.item<int64_t>() >= *options.freeze_bn_step);
    const torch::NoGradGuard no_grad;
    step.add_(1);
  }
  torch::Tensor y;
  if (frozen) {
    auto [w_fold, b_fold] = folded_weight_bias();
    y = conv(x, maybe_fake_quantize(weight_fake_quant, w_fold), b_fold);
  } else {
    const torch::Tensor factor = bn->weight / torch::sqrt(bn->running_var + options.eps);
    y = conv(x, maybe_fake_quantize(weight_fake_quant, weight * factor.reshape({-1, 1, 1, 1})), {});
    // Undo the folding factor; the native batch norm normalises with the batch statistics and
    // updates the running ones (Krishnamoorthi's correction, as in Python's ConvBn2d).
    torch::Tensor y_orig = y / factor.reshape({1, -1, 1, 1});
    if (bias.defined()) y_orig = y_orig + bias.reshape({1, -1, 1, 1});
    {
      const torch::NoGradGuard no_grad;
      bn->num_batches_tracked.add_(1);
    }
    y = torch::batch_norm(y_orig, bn->weight, bn->bias, bn->running_mean, bn->running_var,
                          /*training=*/true, options.momentum, options.eps,
                          /*cudnn_enabled=*/true);
  }
  if (options.conv.relu) y = torch::relu(y);
  return maybe_fake_quantize(activation_post_process, y);
}

QuantStubImpl::QuantStubImpl(const QConfig& qconfig) {
  activation_post_process = make_fake_quantize(qconfig.activation);
  if (activation_post_process) register_module("activation_post_process", activation_post_process);
}

torch::Tensor QuantStubImpl::forward(const torch::Tensor& x) {
  return maybe_fake_quantize(activation_post_process, x);
}

QAddImpl::QAddImpl(const QConfig& qconfig) {
  activation_post_process = make_fake_quantize(qconfig.activation);
  if (activation_post_process) register_module("activation_post_process", activation_post_process);
}

torch::Tensor QAddImpl::forward(const torch::Tensor& x, const torch::Tensor& y) {
  return maybe_fake_quantize(activation_post_process, x + y);
}

}  // namespace qext::nn
