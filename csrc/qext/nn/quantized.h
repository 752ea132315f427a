// Converted (integer) modules for LibTorch programs, mirroring Python's qext.nn.quantized, and
// qext::nn::convert, which turns a trained C++ QAT module into one of them computing what Python's
// qext.convert computes (same integer weights, bias, scales and output parameters).
//
//   qext::nn::QLinear fc(...);                      // trained with fake quantization
//   qext::nn::quantized::Linear q = qext::nn::convert(fc, "fc");
//   at::Tensor y = q->forward(quant->forward(x));   // x quantized by a converted QuantStub
//
// Conversion is layer by layer (C++ has no module graph to walk): convert each QAT module of a
// model and run the converted ones in the same order. convert() leaves the QAT module unchanged
// (the weight quantizer's last look at the weights runs on copies of its state); it throws
// c10::ValueError naming the module (the `name` argument) and the value when a quantizer has no
// data (never observed / never initialised) or an output is quantized per channel.
//
// Activations travel between converted modules as per-tensor quantized tensors (at::kQUInt8 /
// at::kQInt8, at::kQInt32 for wider ranges), as in Python. Linear / Conv2d compute as Jacob et al.
// (2018), see Python's qext.nn.quantized.modules: the int8 kernels (ops::quantized_linear /
// quantized_conv2d) when the weights are 8-bit symmetric, the output 8-bit or float and the input
// an 8-bit quantized tensor; otherwise reference_forward (the same integer sums exactly in
// float64, one rounding), or for float inputs the float layer with the dequantized weights.
//
// State: the same keys as the Python converted modules (weight, weight_scale, weight_zero_point,
// bias, scale, zero_point; absent entries are not registered), plus packed_weight / row_sums, which
// Python keeps as non-persistent buffers (the C++ frontend has none: they are ordinary buffers
// here, so a C++ archive restores them; call repack() after changing `weight` by hand).
#pragma once

#include <torch/expanding_array.h>
#include <torch/nn/module.h>
#include <torch/nn/pimpl.h>

#include <cstdint>
#include <optional>
#include <string>

#include "qext/nn/modules.h"

namespace qext::nn {
namespace quantized {

// Quantization parameters of one tensor.
struct QParams {
  torch::Tensor scale;       // float32, [1] per tensor or [C] per channel
  torch::Tensor zero_point;  // int32, shaped like scale
  int64_t quant_min = 0;
  int64_t quant_max = 0;
  std::optional<int64_t> axis;  // weights: 0 when per output channel
};

// Output quantization shared by the converted modules: buffers scale / zero_point ([1]) and the
// integer range; without them (scale undefined) the module outputs float32.
class QuantizedModule : public torch::nn::Module {
 public:
  bool output_quantized() const { return scale.defined(); }

  torch::Tensor scale, zero_point;
  int64_t out_quant_min = 0, out_quant_max = 0;

 protected:
  void init_output(const std::optional<QParams>& output);
  bool output_is_8bit() const;
  // Quantizes a float result with the output parameters (float32 result without them).
  torch::Tensor finish(const torch::Tensor& y) const;
};

// Float (or quantized) input to a quantized tensor (from a QuantStub). Without output parameters
// (a QuantStub without an activation quantizer) it is the identity on float inputs.
class QuantizeImpl : public QuantizedModule {
 public:
  explicit QuantizeImpl(const std::optional<QParams>& output);
  torch::Tensor forward(const torch::Tensor& x);
};
TORCH_MODULE(Quantize);

// Quantized tensor to float32; float inputs pass through.
class DeQuantizeImpl : public torch::nn::Module {
 public:
  torch::Tensor forward(const torch::Tensor& x);
};
TORCH_MODULE(DeQuantize);

// Residual add: quantize(dequantize(x) + dequantize(y)) with the add's own output parameters
// (ops::quantized_add for 8-bit inputs and output); float output without them.
class QAddImpl : public QuantizedModule {
 public:
  explicit QAddImpl(const std::optional<QParams>& output);
  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& y);
  torch::Tensor reference_forward(const torch::Tensor& x, const torch::Tensor& y) const;
};
TORCH_MODULE(QAdd);

// Integer weights (float32 when the QAT layer had no weight quantizer), float32 bias, optional
// fused ReLU: what Linear and Conv2d share.
class WeightedModule : public QuantizedModule {
 public:
  torch::Tensor forward(const torch::Tensor& x);
  // The integer reference path (float64 arithmetic on the levels, requantized with one rounding)
  // for quantized inputs; the float layer with dequantized weights for float inputs.
  torch::Tensor reference_forward(const torch::Tensor& x) const;
  // float32 weights the layer computes with ((q_w - z_w) * s_w).
  torch::Tensor dequantized_weight() const;
  bool weight_quantized() const { return weight_scale.defined(); }
  // Re-derives packed_weight / row_sums from weight.
  void repack();

  torch::Tensor weight, weight_scale, weight_zero_point, bias, packed_weight, row_sums;
  int64_t weight_quant_min = 0, weight_quant_max = 0;
  std::optional<int64_t> weight_axis;
  bool relu = false;

 protected:
  void init_weight(const torch::Tensor& weight, const torch::Tensor& bias,
                   const std::optional<QParams>& weight_qparams, bool relu);
  virtual int64_t groups() const { return 1; }
  // The float layer (linear / conv2d) applied to x with weights w and bias b (may be undefined).
  virtual torch::Tensor apply(const torch::Tensor& x, const torch::Tensor& w,
                              const torch::Tensor& b) const = 0;
  // A per-output-channel vector shaped to broadcast against the layer's output.
  virtual torch::Tensor channel_view(const torch::Tensor& t) const = 0;
  // The int8 kernel (called with an 8-bit quantized input and packed weights).
  virtual torch::Tensor kernel_forward(const torch::Tensor& x) const = 0;
  // Output parameters as the kernels take them (scale empty: float output).
  std::optional<double> kernel_output_scale() const;
};

// Converted Linear / LinearReLU (relu = true).
class LinearImpl : public WeightedModule {
 public:
  // weight [out, in] float32 (quantized here with weight_qparams; kept float without them), bias
  // [out] or undefined, output parameters or none (float output).
  LinearImpl(const torch::Tensor& weight, const torch::Tensor& bias,
             const std::optional<QParams>& weight_qparams, const std::optional<QParams>& output,
             bool relu = false);

 protected:
  torch::Tensor apply(const torch::Tensor& x, const torch::Tensor& w,
                      const torch::Tensor& b) const override;
  torch::Tensor channel_view(const torch::Tensor& t) const override { return t; }
  torch::Tensor kernel_forward(const torch::Tensor& x) const override;
};
TORCH_MODULE(Linear);

// Geometry of a converted convolution (zero padding).
struct Conv2dGeometry {
  torch::ExpandingArray<2> stride = 1;
  torch::ExpandingArray<2> padding = 0;
  torch::ExpandingArray<2> dilation = 1;
  int64_t groups = 1;
};

// Converted Conv2d / ConvReLU2d / ConvBn2d / ConvBnReLU2d (batch norm folded into weight and bias).
class Conv2dImpl : public WeightedModule {
 public:
  // weight [out, in / groups, kh, kw] float32, as Linear otherwise.
  Conv2dImpl(const torch::Tensor& weight, const torch::Tensor& bias,
             const std::optional<QParams>& weight_qparams, const std::optional<QParams>& output,
             Conv2dGeometry geometry, bool relu = false);

  Conv2dGeometry geometry;

 protected:
  int64_t groups() const override { return geometry.groups; }
  torch::Tensor apply(const torch::Tensor& x, const torch::Tensor& w,
                      const torch::Tensor& b) const override;
  torch::Tensor channel_view(const torch::Tensor& t) const override {
    return t.reshape({1, -1, 1, 1});
  }
  torch::Tensor kernel_forward(const torch::Tensor& x) const override;
};
TORCH_MODULE(Conv2d);

}  // namespace quantized

// Conversion of trained QAT modules (see the file comment). `name` names the module in error
// messages. The results are in eval mode, on the QAT module's device.
quantized::Linear convert(const QLinear& qat, const std::string& name = "");
quantized::Conv2d convert(const QConv2d& qat, const std::string& name = "");
// The batch norm folded with its running statistics (ConvBn2dImpl::folded_weight_bias), as Python.
quantized::Conv2d convert(const ConvBn2d& qat, const std::string& name = "");
quantized::Quantize convert(const QuantStub& qat, const std::string& name = "");
quantized::QAdd convert(const QAdd& qat, const std::string& name = "");

}  // namespace qext::nn
