#include "qext/nn/modules.h"

#include <torch/nn/functional/activation.h>
#include <torch/nn/init.h>
#include <torch/torch.h>

#include <cmath>
#include <limits>

#include "qext/ops/fake_quantize_observe.h"

namespace qext::nn {

namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();

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

}  // namespace

ObserverImpl::ObserverImpl() {
  min_val = register_buffer("min_val", torch::empty({0}));
  max_val = register_buffer("max_val", torch::empty({0}));
}

FakeQuantizeImpl::FakeQuantizeImpl(QuantSpec spec) : spec_(spec) {
  spec_.validate();
  const int64_t zp = spec_.symmetric && spec_.quant_min() >= 0
                         ? (spec_.quant_min() + spec_.quant_max() + 1) / 2
                         : 0;
  scale = register_buffer("scale", torch::ones({1}));
  zero_point = register_buffer("zero_point", torch::full({1}, zp, torch::kInt));
  fake_quant_enabled = register_buffer("fake_quant_enabled", torch::ones({1}, torch::kUInt8));
  observer_enabled = register_buffer("observer_enabled", torch::ones({1}, torch::kUInt8));
  observer = register_module("observer", Observer());
}

void FakeQuantizeImpl::enable_observer(bool enabled) { observer_enabled.fill_(enabled ? 1 : 0); }

void FakeQuantizeImpl::enable_fake_quant(bool enabled) {
  fake_quant_enabled.fill_(enabled ? 1 : 0);
}

void FakeQuantizeImpl::ensure_state(const torch::Tensor& x) {
  const int64_t channels = spec_.axis.has_value() ? x.size(*spec_.axis) : 1;
  if (observer->min_val.numel() == channels) return;
  TORCH_CHECK_VALUE(observer->min_val.numel() == 0, "FakeQuantize: observed ",
                    observer->min_val.numel(), " channels before, got an input with ", channels,
                    " along axis ", spec_.axis.value_or(-1));
  const torch::NoGradGuard no_grad;
  const auto options = x.options().dtype(torch::kFloat);
  // Module::buffers hold the same TensorImpl: set_ keeps the registration pointing at the data.
  observer->min_val.set_(torch::full({channels}, kInf, options));
  observer->max_val.set_(torch::full({channels}, -kInf, options));
  scale.set_(scale.expand({channels}).to(options).clone());
  zero_point.set_(zero_point.expand({channels}).to(x.device()).clone());
}

torch::Tensor FakeQuantizeImpl::forward(const torch::Tensor& x) {
  const bool observe = observer_enabled.item<uint8_t>() != 0;
  const bool quantize = fake_quant_enabled.item<uint8_t>() != 0;
  if (!observe && !quantize) return x;
  ensure_state(x);
  const std::optional<double> averaging = spec_.observer == ObserverKind::kMovingAverage
                                              ? std::optional<double>(spec_.averaging_constant)
                                              : std::nullopt;
  torch::Tensor y = ops::fake_quantize_observe(
      x, observer->min_val, observer->max_val, scale, zero_point, averaging, spec_.quant_min(),
      spec_.quant_max(), spec_.symmetric, spec_.axis, observe);
  return quantize ? y : x;
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

std::pair<torch::Tensor, torch::Tensor> ConvBn2dImpl::folded_weight_bias() {
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
