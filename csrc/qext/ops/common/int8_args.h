// Argument checking and per-call parameters of the integer-only layer ops (quantized_layers.h),
// shared by their CPU and CUDA kernels: every bad argument gets the same message on either device,
// before anything is allocated or written.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "qext/kernels/qconv.h"
#include "qext/kernels/qgemm.h"

namespace qext::ops::detail {

// A per-tensor quantized input (torch.quint8 / torch.qint8) seen as uint8 levels: int8 levels are
// flipped (q ^ 0x80 = q + 128) and the zero point moved by 128, which leaves q - z unchanged.
struct Int8Input {
  double scale = 1.0;
  int32_t zero_point = 0;  // of the uint8 levels
  uint8_t flip = 0;        // 0x80 for torch.qint8 storage, else 0
};
Int8Input resolve_int8_input(const at::Tensor& input, const char* op, const char* name = "input");

// Where an integer layer writes: 8-bit levels of a per-tensor quantized tensor (quint8 when
// [min, max] fits [0, 255], else qint8), or float32 when there is no output scale.
struct Int8Output {
  bool is_float = false;
  double scale = 1.0;
  int32_t zero_point = 0;
  int32_t min = 0;  // clamp range, ReLU folded in (min = max(min, zero_point))
  int32_t max = 0;
  bool relu = false;  // float output: max(y, 0)
  at::ScalarType dtype = at::kQUInt8;
};
Int8Output resolve_int8_output(std::optional<double> scale, int64_t zero_point, int64_t min,
                               int64_t max, bool relu, const char* op);

// An empty per-tensor quantized (or float32) tensor for `out`.
at::Tensor empty_int8_output(at::IntArrayRef sizes, const Int8Output& out,
                             const at::TensorOptions& device_options,
                             at::MemoryFormat memory_format = at::MemoryFormat::Contiguous);

// The GEMM of a quantized_linear call: input [..., in_features] (rows = the leading elements)
// against a weight of weight_shape [out_features, in_features]; packed_bytes is what its packed
// weight must hold.
struct LinearShape {
  int64_t rows = 0, out_features = 0, in_features = 0, packed_bytes = 0;
};
LinearShape linear_shape(const at::Tensor& input, at::IntArrayRef weight_shape, const char* op);

// The convolution of a quantized_conv2d call: input [N, C, H, W] and a weight of weight_shape
// [out_channels, C / groups, kh, kw]. Depthwise convolutions (groups == C == out_channels > 1)
// have their own packed layout (tap-major, kh * kw * C bytes), the others one packed GEMM weight of
// group_bytes per group.
struct Conv2dShape {
  kernels::Conv2dGeometry geometry{};
  bool depthwise = false;
  int64_t group_bytes = 0, packed_bytes = 0;
};
Conv2dShape conv2d_shape(const at::Tensor& input, at::IntArrayRef weight_shape,
                         at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                         int64_t groups, const char* op);

// Everything the kernels of one quantized_linear / quantized_conv2d call need, per output channel:
// the int32 bias round(bias / (s_x * s_w)) (empty without bias) and the rest of it (bias_fraction,
// in [-1/2, 1/2] accumulator units), the requantization multipliers s_x * s_w / s_out (8-bit
// output; their offsets carry bias_fraction) or the float scales s_x * s_w (float output).
struct Int8LayerParams {
  Int8Input input;
  Int8Output output;
  int64_t out_channels = 0;
  std::vector<int32_t> bias;
  std::vector<double> bias_fraction;
  std::vector<kernels::FixedPointMultiplier> multiplier;
  std::vector<float> float_scale;
};

// Checks the weight tensors (packed_weight int8 1-D of packed_bytes bytes, row_sums int32 [N] for
// N = out_channels, weight_scale float32 [1] or [N] finite and > 0, bias float32 [N] finite), that
// the int32 accumulation over `reduction` (K) terms is exact, and derives the per-channel
// parameters.
Int8LayerParams resolve_int8_layer(const at::Tensor& input, const at::Tensor& packed_weight,
                                   int64_t packed_bytes, const at::Tensor& row_sums,
                                   int64_t out_channels, const at::Tensor& weight_scale,
                                   const std::optional<at::Tensor>& bias, int64_t reduction,
                                   const Int8Output& output, const char* op);

// Everything one quantized_linear / quantized_conv2d call has checked and derived, in the order
// both backends check it (so the same bad argument gets the same message on either device).
struct LinearCall {
  LinearShape shape;
  Int8LayerParams params;
};
LinearCall resolve_linear_call(const at::Tensor& input, const at::Tensor& packed_weight,
                               const at::Tensor& row_sums, at::IntArrayRef weight_shape,
                               const at::Tensor& weight_scale,
                               const std::optional<at::Tensor>& bias,
                               std::optional<double> output_scale, int64_t output_zero_point,
                               int64_t output_min, int64_t output_max, bool relu);
struct Conv2dCall {
  Conv2dShape shape;
  Int8LayerParams params;
};
Conv2dCall resolve_conv2d_call(const at::Tensor& input, const at::Tensor& packed_weight,
                               const at::Tensor& row_sums, at::IntArrayRef weight_shape,
                               const at::Tensor& weight_scale,
                               const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                               at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                               std::optional<double> output_scale, int64_t output_zero_point,
                               int64_t output_min, int64_t output_max, bool relu);

// The epilogues of those parameters for the output channels [first, first + count).
kernels::RequantEpilogue requant_epilogue(const Int8LayerParams& p, const int32_t* row_sums,
                                          int64_t first);
kernels::FloatEpilogue float_epilogue(const Int8LayerParams& p, const int32_t* row_sums,
                                      int64_t first);

// The ISA the CPU integer kernels use: the fastest available, unless set_int8_isa() chose one
// ("auto", "scalar", "avx2", "avx512_vnni", "amx"; for tests and benchmarks).
kernels::Isa int8_gemm_isa(int64_t rows);
const std::vector<kernels::Isa>& all_int8_isas();  // every ISA, reference first
void set_int8_isa(const std::string& name);
std::string int8_isa_name();

}  // namespace qext::ops::detail
