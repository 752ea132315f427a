// Integer-only layers of converted models (Jacob et al. 2018): int8 weights pre-packed once,
// uint8 / int8 activations as per-tensor quantized tensors (torch.quint8 / torch.qint8, their scale
// and zero point read from the tensor), int32 bias and accumulators, fixed-point requantization.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

namespace qext::ops {

// Packs int8 weights for quantized_linear ([out, in]) or quantized_conv2d ([out, in / groups, kh,
// kw]) into the layout the CPU kernels read (ISA independent: a packed weight runs on any CPU and,
// moved to the GPU, on CUDA). Returns (packed int8 1-D, row_sums int32 [out]: the sum of each
// output channel's weights). Depthwise weights (groups == out == in) are packed tap-major for the
// direct depthwise kernel.
std::tuple<at::Tensor, at::Tensor> pack_quantized_weight(const at::Tensor& weight,
                                                         int64_t groups = 1);

// y = requantize(sum_k (x - z_x) * w + round(bias / (s_x * s_w))) as a per-tensor quantized tensor
// (weight_shape: the [out, in] shape of the weight that was packed)
// with output_scale / output_zero_point (quint8 when [output_min, output_max] fits [0, 255], else
// qint8), clamped to [output_min, output_max] (and at the zero point with relu). Without
// output_scale the output is float32: acc * s_x * s_w (relu applied). weight_scale: float32, one
// entry (per tensor) or one per output channel; weights are symmetric (zero point 0).
at::Tensor quantized_linear(const at::Tensor& input, const at::Tensor& packed_weight,
                            const at::Tensor& row_sums, at::IntArrayRef weight_shape,
                            const at::Tensor& weight_scale, const std::optional<at::Tensor>& bias,
                            std::optional<double> output_scale, int64_t output_zero_point,
                            int64_t output_min, int64_t output_max, bool relu = false);

// The same for a 2-D convolution, weight_shape [out, in / groups, kh, kw] (zero padding: padded
// taps are the input zero point). The output is NCHW-shaped in channels_last memory format.
at::Tensor quantized_conv2d(const at::Tensor& input, const at::Tensor& packed_weight,
                            const at::Tensor& row_sums, at::IntArrayRef weight_shape,
                            const at::Tensor& weight_scale, const std::optional<at::Tensor>& bias,
                            at::IntArrayRef stride, at::IntArrayRef padding,
                            at::IntArrayRef dilation, int64_t groups,
                            std::optional<double> output_scale, int64_t output_zero_point,
                            int64_t output_min, int64_t output_max, bool relu = false);

// Residual add of two quantized tensors of one shape, requantized to the output parameters.
at::Tensor quantized_add(const at::Tensor& a, const at::Tensor& b, double output_scale,
                         int64_t output_zero_point, int64_t output_min, int64_t output_max,
                         bool relu = false);

// Average pooling of a quantized NCHW tensor (torch.nn.AvgPool2d's windows), requantized to the
// output parameters.
at::Tensor quantized_avg_pool2d(const at::Tensor& input, at::IntArrayRef kernel_size,
                                at::IntArrayRef stride, at::IntArrayRef padding, bool ceil_mode,
                                bool count_include_pad, std::optional<int64_t> divisor_override,
                                double output_scale, int64_t output_zero_point, int64_t output_min,
                                int64_t output_max);

// Adaptive average pooling (torch.nn.AdaptiveAvgPool2d's windows), requantized.
at::Tensor quantized_adaptive_avg_pool2d(const at::Tensor& input, at::IntArrayRef output_size,
                                         double output_scale, int64_t output_zero_point,
                                         int64_t output_min, int64_t output_max);

// Max pooling of a quantized tensor ([N, C, H, W] or [C, H, W]; torch.nn.MaxPool2d's windows, an
// empty stride meaning the kernel_size). The output has the input's dtype, scale, zero point and
// memory format: max commutes with the affine map, nothing is requantized.
at::Tensor quantized_max_pool2d(const at::Tensor& input, at::IntArrayRef kernel_size,
                                at::IntArrayRef stride, at::IntArrayRef padding,
                                at::IntArrayRef dilation, bool ceil_mode);

// torch.flatten of a quantized tensor, the same values, qparams and strides. When the dimensions
// cannot be merged in place (torch copies), a 4-d channels-last 8-bit per-tensor input (what the
// converted convolutions write) is first reordered to NCHW by a block transpose: torch's copy
// moves such tensors one byte at a time. qext.nn.quantized.Flatten runs it.
at::Tensor quantized_flatten(const at::Tensor& input, int64_t start_dim, int64_t end_dim);

// Which CPU kernels the integer layers use: "auto" (the fastest this CPU runs; AMX from 8 rows) or
// one of supported_int8_isas() ("scalar", "avx2", "avx512_vnni", "amx"), for tests and benchmarks.
void set_int8_isa(const std::string& name);
std::string int8_isa();
std::vector<std::string> supported_int8_isas();

// How many weight layouts the CPU convolution holds, derived once from packed weights on AMX (the
// implicit kernel's segments, block-diagonal grouped weights) and dropped once their packed weight
// is freed (at the next convolution that derives one); for tests.
int64_t derived_weight_entries();

}  // namespace qext::ops
