// C++ QAT modules (torch::nn) for LibTorch programs: the same structure and state_dict keys as the
// Python modules in qext.nn (weight, bias, weight_fake_quant.*, activation_post_process.*), so a
// model can be trained in one language and its state loaded in the other.
#pragma once

#include <torch/nn/module.h>
#include <torch/nn/pimpl.h>

#include <cstdint>

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

}  // namespace qext::nn
