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

// Observer + straight-through fake quantization (ops::fake_quantize_observe). Buffers scale,
// zero_point, fake_quant_enabled, observer_enabled; submodule observer.
class FakeQuantizeImpl : public torch::nn::Module {
 public:
  explicit FakeQuantizeImpl(QuantSpec spec);
  torch::Tensor forward(const torch::Tensor& x);

  void enable_observer(bool enabled);
  void enable_fake_quant(bool enabled);
  const QuantSpec& spec() const { return spec_; }

  torch::Tensor scale, zero_point, fake_quant_enabled, observer_enabled;
  Observer observer;

 private:
  // Sizes the buffers for the channel count of x on first use (per-channel specs).
  void ensure_state(const torch::Tensor& x);
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
  std::pair<torch::Tensor, torch::Tensor> folded_weight_bias();

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
