// C++ QAT modules (torch::nn) for LibTorch programs: the same structure and state_dict keys as the
// Python modules in qext.nn (weight, bias, weight_fake_quant.*, activation_post_process.*), so a
// model can be trained in one language and its state loaded in the other.
#pragma once

#include <torch/nn/module.h>
#include <torch/nn/modules/batchnorm.h>
#include <torch/nn/pimpl.h>

#include <cstdint>
#include <optional>
#include <utility>

#include "qext/nn/qconfig.h"

namespace qext::nn {

// The running statistics of a quantizer: buffers min_val / max_val (one element per channel, +inf /
// -inf until data is seen), like Python's MinMaxObserver / MovingAverageMinMaxObserver.
class ObserverImpl : public torch::nn::Module {
 public:
  ObserverImpl();
  torch::Tensor min_val, max_val;
};
TORCH_MODULE(Observer);

// Fake quantization of one tensor, as Python's qext.fake_quant.FakeQuantize.
//
// Straight-through (spec.learnable false): observer + ops::fake_quantize_observe. Buffers scale,
// zero_point (int32), fake_quant_enabled, observer_enabled; submodule observer.
//
// Learnable (LSQ / LSQ+, spec.learnable true): parameter scale; zero_point a float32 parameter
// when the spec is affine, a float32 buffer when symmetric; buffer initialized (uint8). On the
// first batch seen with the observer enabled they are initialised as Python does: symmetric
// scale = 2 mean(|x|) / sqrt(quant_max) over the finite values (per tensor or per channel), zero
// point fixed; affine from the observer's min/max of that batch. Then trained through
// ops::fake_quantize_learnable with grad_factor 1 / sqrt(numel per scale * quant_max), the forward
// using max(scale, eps) with a straight-through gradient. Per-channel parameters start with one
// element and take their channel count from the first batch: build the optimizer before, but
// step it only after, the first forward (its state is created lazily, at the first step).
class FakeQuantizeImpl : public torch::nn::Module {
 public:
  explicit FakeQuantizeImpl(QuantSpec spec);
  torch::Tensor forward(const torch::Tensor& x);

  void enable_observer(bool enabled);
  void enable_fake_quant(bool enabled);
  const QuantSpec& spec() const { return spec_; }

  // Whether the quantization parameters come from data: an observer that saw an input, or an
  // initialised learnable quantizer.
  bool has_data() const;
  // (scale float32, zero_point int32), shape [1] or [C], as an integer model uses them (Python's
  // FakeQuantize.calculate_qparams): straight-through, choose_qparams of the observer's range;
  // learnable, max(scale, eps) and the zero point rounded half to even and clamped. c10::ValueError
  // when nothing was observed. Changes nothing.
  std::pair<torch::Tensor, torch::Tensor> calculate_qparams() const;
  // The same after this quantizer saw x in a forward pass (the observer folds x in when enabled;
  // an uninitialised learnable quantizer initialises from x), computed on copies: the module is
  // left unchanged. What convert() quantizes weights with.
  std::pair<torch::Tensor, torch::Tensor> calculate_qparams(const torch::Tensor& x) const;

  torch::Tensor scale, zero_point, fake_quant_enabled, observer_enabled;
  torch::Tensor initialized;  // learnable only
  Observer observer;

 private:
  // Sizes the observer / quantizer buffers for the channel count of x on first use (per-channel
  // straight-through specs).
  void ensure_state(const torch::Tensor& x);
  // Channels of x along the spec's axis (1 per-tensor), checked against the observer's.
  int64_t channels_of(const torch::Tensor& x) const;
  // Copies of the observer statistics, or fresh ones sized for x when it has seen nothing.
  std::pair<torch::Tensor, torch::Tensor> observer_range(const torch::Tensor& x) const;
  torch::Tensor forward_learnable(const torch::Tensor& x, bool observe, bool quantize);
  QuantSpec spec_;
};
TORCH_MODULE(FakeQuantize);

// Linear with fake-quantized weight and output; relu = true is Python's LinearReLU.
struct QLinearOptions {
  int64_t in_features;
  int64_t out_features;
  bool bias = true;
  bool relu = false;
  QConfig qconfig;
};

class QLinearImpl : public torch::nn::Module {
 public:
  explicit QLinearImpl(QLinearOptions options);
  torch::Tensor forward(const torch::Tensor& x);

  QLinearOptions options;
  torch::Tensor weight, bias;
  FakeQuantize weight_fake_quant{nullptr}, activation_post_process{nullptr};
};
TORCH_MODULE(QLinear);

// Conv2d with fake-quantized weight and output; relu = true is Python's ConvReLU2d.
struct QConv2dOptions {
  int64_t in_channels;
  int64_t out_channels;
  int64_t kernel_size;
  int64_t stride = 1;
  int64_t padding = 0;
  int64_t dilation = 1;
  int64_t groups = 1;
  bool bias = true;
  bool relu = false;
  QConfig qconfig;
};

class QConv2dImpl : public torch::nn::Module {
 public:
  explicit QConv2dImpl(QConv2dOptions options);
  torch::Tensor forward(const torch::Tensor& x);

  QConv2dOptions options;
  torch::Tensor weight, bias;
  FakeQuantize weight_fake_quant{nullptr}, activation_post_process{nullptr};
};
TORCH_MODULE(QConv2d);

// Conv2d + BatchNorm2d (+ ReLU) with the batch norm folded into the weights as Python's
// qext.nn.ConvBn2d / ConvBnReLU2d (Krishnamoorthi 2018): in training the conv runs with the
// fake-quantized folded weight w * gamma / sigma and the native batch norm applies the batch
// statistics correction and updates the running statistics, until `freeze_bn_step` training steps
// (or freeze_bn_stats()); frozen or in eval, conv(x, fq(w_fold), b_fold) with the running
// statistics. State: weight, bias (if any), bn.*, step, weight_fake_quant.*,
// activation_post_process.*.
struct ConvBn2dOptions {
  QConv2dOptions conv;  // conv.relu selects ConvBnReLU2d
  double eps = 1e-5;
  double momentum = 0.1;
  std::optional<int64_t> freeze_bn_step;
};

class ConvBn2dImpl : public torch::nn::Module {
 public:
  explicit ConvBn2dImpl(ConvBn2dOptions options);
  torch::Tensor forward(const torch::Tensor& x);

  void freeze_bn_stats(bool frozen = true) { bn_frozen_ = frozen; }
  // (w * gamma / sigma, beta + (b - mu) * gamma / sigma) with the running statistics.
  std::pair<torch::Tensor, torch::Tensor> folded_weight_bias() const;

  ConvBn2dOptions options;
  torch::Tensor weight, bias, step;
  torch::nn::BatchNorm2d bn{nullptr};
  FakeQuantize weight_fake_quant{nullptr}, activation_post_process{nullptr};

 private:
  torch::Tensor conv(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& b) const;
  bool bn_frozen_ = false;
};
TORCH_MODULE(ConvBn2d);

// Fake-quantizes the model input with the activation spec (Python's QuantStub).
class QuantStubImpl : public torch::nn::Module {
 public:
  explicit QuantStubImpl(const QConfig& qconfig);
  torch::Tensor forward(const torch::Tensor& x);
  FakeQuantize activation_post_process{nullptr};
};
TORCH_MODULE(QuantStub);

// Residual add whose sum gets its own output quantizer (Python's QAdd).
class QAddImpl : public torch::nn::Module {
 public:
  explicit QAddImpl(const QConfig& qconfig);
  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& y);
  FakeQuantize activation_post_process{nullptr};
};
TORCH_MODULE(QAdd);

}  // namespace qext::nn
