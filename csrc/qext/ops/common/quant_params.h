// Argument checking and parameter resolution shared by every backend of the quantization ops.
// Each backend kernel (CPU, CUDA, Meta) calls these first, so a bad argument gets the same clear
// error whichever device the tensors are on, and before anything is allocated or written.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <optional>
#include <tuple>
#include <utility>
#include <vector>

namespace qext::ops::detail {

// How an op interprets its zero_point argument.
enum class ZeroPointKind {
  kInteger,    // integer tensor, every value inside [quant_min, quant_max]
  kLearnable,  // real-valued (LSQ+): rounded half-to-even and clamped to the range, as torch does
  kStorage,    // dequantize: integer tensor inside the storage dtype's range [quant_min, quant_max]
};

// The channel structure of a non-overlapping and dense tensor, in memory order: the element at
// memory offset p belongs to channel (p / inner) % channels. Per-tensor: channels = inner = 1.
struct ChannelLayout {
  int64_t outer = 1;
  int64_t channels = 1;
  int64_t inner = 1;
};

// Everything a kernel needs, validated. Scales and zero points are host float arrays (one entry
// per channel; one entry for per-tensor) with 1/scale precomputed the way torch does it.
struct QuantParams {
  int64_t quant_min = 0;
  int64_t quant_max = 0;
  std::optional<int64_t> axis;  // normalised; empty for per-tensor
  ChannelLayout layout;
  std::vector<float> scale;
  std::vector<float> inv_scale;
  std::vector<float> zero_point;

  bool per_channel() const { return axis.has_value(); }
};

// quant_min < quant_max, a range of at most 16 bits, values within [-65536, 65535].
void check_quant_range(int64_t quant_min, int64_t quant_max, const char* op);

// input is a real floating-point tensor.
void check_float_input(const at::Tensor& input, const char* op, const char* name = "input");

// axis normalised to [0, input.dim()), or an IndexError naming it; empty stays empty.
std::optional<int64_t> normalize_axis(const at::Tensor& input, std::optional<int64_t> axis,
                                      const char* op);

// The channel structure of dense_input along a normalised axis (one channel when axis is empty).
ChannelLayout channel_layout(const at::Tensor& dense_input, std::optional<int64_t> axis);

// Checks the dtypes, shapes and devices of (input, scale, zero_point, axis) without reading any
// values; this is all the Meta kernels can check. Returns the normalised axis (empty for
// per-tensor: scale with one element).
std::optional<int64_t> check_quant_signature(const at::Tensor& input, const at::Tensor& scale,
                                             const at::Tensor& zero_point, int64_t quant_min,
                                             int64_t quant_max, std::optional<int64_t> axis,
                                             ZeroPointKind kind, const char* op);

// Full validation, values included (scale finite and > 0, zero point in range), and the resolved
// parameters for `dense_input` (a non-overlapping and dense tensor, see as_dense). Reads scale and
// zero_point on the host: one device-to-host copy for CUDA tensors.
QuantParams resolve_quant_params(const at::Tensor& dense_input, const at::Tensor& scale,
                                 const at::Tensor& zero_point, int64_t quant_min, int64_t quant_max,
                                 std::optional<int64_t> axis, ZeroPointKind kind, const char* op);

// resolve_quant_params for one scale and zero point given as numbers (no tensor reads): checks the
// range and a floating input (kStorage: neither, the caller took the range from the storage dtype),
// then the values, with the same errors.
QuantParams per_tensor_params(const at::Tensor& dense_input, double scale, double zero_point,
                              int64_t quant_min, int64_t quant_max, ZeroPointKind kind,
                              const char* op);

// input itself when it is non-overlapping and dense (any dim order, e.g. channels_last), else a
// contiguous copy. Kernels then walk memory linearly, and at::empty_like keeps the same layout.
at::Tensor as_dense(const at::Tensor& input);

// Brings grad to the given sizes and (dense) strides, copying only when they differ, so that an
// elementwise backward can walk grad's memory in step with what the forward saved.
at::Tensor align_to_layout(const at::Tensor& grad, at::IntArrayRef sizes, at::IntArrayRef strides);

// dequantize's inputs, checked: the dense integer tensor, its parameters and the output dtype
// (float32 unless `dtype` names another floating type).
struct DequantizeArgs {
  at::Tensor q;
  QuantParams params;
  at::ScalarType out_type;
};
DequantizeArgs resolve_dequantize_args(const at::Tensor& input, const at::Tensor& scale,
                                       const at::Tensor& zero_point, std::optional<int64_t> axis,
                                       std::optional<at::ScalarType> dtype);

// The integer dtype quantize stores into: `requested` if given (it must be int8, uint8 or int32 and
// hold [quant_min, quant_max]), else the smallest of uint8, int8, int32 that holds the range.
at::ScalarType quantized_storage_type(int64_t quant_min, int64_t quant_max,
                                      std::optional<at::ScalarType> requested, const char* op);

// [min, max] of the values an integer storage dtype may hold (int32: the 17-bit span of
// check_quant_range). Errors for any dtype other than int8, uint8, int32.
std::pair<int64_t, int64_t> storage_range(at::ScalarType dtype, const char* op);

// Calls f(T{}) with T the C++ type of an integer storage dtype: uint8_t, int8_t or int32_t.
template <typename F>
void visit_storage_type(at::ScalarType dtype, F&& f) {
  switch (dtype) {
    case at::kByte:
      f(uint8_t{});
      break;
    case at::kChar:
      f(int8_t{});
      break;
    case at::kInt:
      f(int32_t{});
      break;
    default:
      TORCH_CHECK(false, "integer storage must be int8, uint8 or int32, got ", dtype);
  }
}

// The gradient of a learnable zero point has its dtype when it is floating, else scale's.
at::ScalarType zero_point_grad_dtype(const at::Tensor& zero_point, const at::Tensor& scale);

// Turns per-channel double sums of the dscale / dzero_point terms into the gradients the
// learnable backward returns: times grad_factor, in the dtypes and shapes of scale and zero_point.
std::tuple<at::Tensor, at::Tensor> learnable_param_grads(const at::Tensor& dscale_sums,
                                                         const at::Tensor& dzp_sums,
                                                         const at::Tensor& scale,
                                                         const at::Tensor& zero_point,
                                                         double grad_factor);

// Number of bytes of a bit-packed mask for n elements: one bit per element, padded to 32 bits so
// CUDA kernels can write whole words (byte-wise little-endian order: bit i is byte i/8, bit i%8).
int64_t packed_mask_bytes(int64_t numel);

}  // namespace qext::ops::detail
