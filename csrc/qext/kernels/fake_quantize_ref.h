// Scalar reference kernels for affine fake quantization. Framework-free: raw pointers in and out.
//
// They follow PyTorch's CPU formula (ATen QuantizedOpKernels.cpp) operation by operation, so that
// torch.fake_quantize_per_{tensor,channel}_affine is a bit-exact reference for finite inputs:
//   q = nearbyint(x * inv_scale) + zero_point, inv_scale = 1.0f / scale (float),
//   y = (clamp(q, quant_min, quant_max) - zero_point) * scale.
// Arithmetic is in float for float/half/bfloat16 inputs and in double for double inputs.
// Deliberate differences from torch: NaN inputs propagate as NaN and +-inf saturate to the range
// ends (torch converts them to int64, which yields quant_min for all three).
#pragma once

#include <cmath>
#include <cstdint>
#include <type_traits>

namespace qext::kernels {

// One affine quantizer (one tensor or one channel), with its float-valued constants precomputed.
struct AffineQuantizer {
  float scale;
  float inv_scale;
  float zero_point;
  float quant_min;
  float quant_max;
};

// The quantizers of a row of elements, as arrays: element i uses entry i * step, so step is 0 when
// one quantizer covers the row (per-tensor, or a run of one channel) and 1 when the channel changes
// with every element (per-channel along the innermost memory dimension).
struct QuantizerRow {
  const float* scale;
  const float* inv_scale;
  const float* zero_point;
  int64_t step;
  float quant_min;
  float quant_max;

  AffineQuantizer at(int64_t i) const {
    const int64_t k = i * step;
    return {scale[k], inv_scale[k], zero_point[k], quant_min, quant_max};
  }

  // The row that starts at element i of this one.
  QuantizerRow from(int64_t i) const {
    const int64_t k = i * step;
    return {scale + k, inv_scale + k, zero_point + k, step, quant_min, quant_max};
  }
};

// Accumulation type: double for double inputs, float for everything else (half, bfloat16, float).
template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

// Clamp that lets NaN through (std::fmin/fmax would replace it by the bound).
template <typename A>
inline A clamp_keep_nan(A q, A lo, A hi) {
  return q < lo ? lo : (q > hi ? hi : q);
}

// Unclamped integer level of x (as a float), NaN for NaN input.
template <typename T>
inline acc_t<T> quant_level(T x, const AffineQuantizer& q) {
  using A = acc_t<T>;
  return std::nearbyint(static_cast<A>(x) * static_cast<A>(q.inv_scale)) +
         static_cast<A>(q.zero_point);
}

template <typename T>
inline T fake_quantize_value(T x, const AffineQuantizer& q, bool* in_range) {
  using A = acc_t<T>;
  const A level = quant_level(x, q);
  *in_range = level >= static_cast<A>(q.quant_min) && level <= static_cast<A>(q.quant_max);
  const A clamped = clamp_keep_nan(level, static_cast<A>(q.quant_min), static_cast<A>(q.quant_max));
  return static_cast<T>((clamped - static_cast<A>(q.zero_point)) * static_cast<A>(q.scale));
}

// q[i] = the clamped level of x[i] with quantizer row.at(i), stored as the integer type Q (whose
// range must hold [quant_min, quant_max]). Returns false at the first NaN input, which has no
// level; q is then only partly written.
template <typename T, typename Q>
bool quantize_row_ref(const T* x, Q* q, int64_t n, const QuantizerRow& row) {
  using A = acc_t<T>;
  const A lo = static_cast<A>(row.quant_min), hi = static_cast<A>(row.quant_max);
  for (int64_t i = 0; i < n; ++i) {
    const A level = quant_level(x[i], row.at(i));
    if (level != level) return false;
    q[i] = static_cast<Q>(clamp_keep_nan(level, lo, hi));
  }
  return true;
}

// x[i] = (q[i] - zero_point) * scale with quantizer row.at(i), computed in acc_t<T>.
template <typename Q, typename T>
void dequantize_row_ref(const Q* q, T* x, int64_t n, const QuantizerRow& row) {
  using A = acc_t<T>;
  for (int64_t i = 0; i < n; ++i) {
    const AffineQuantizer p = row.at(i);
    x[i] = static_cast<T>((static_cast<A>(q[i]) - static_cast<A>(p.zero_point)) *
                          static_cast<A>(p.scale));
  }
}

inline void set_mask_bit(uint8_t* mask, int64_t bit) {
  mask[bit >> 3] |= static_cast<uint8_t>(1u << (bit & 7));
}

inline bool mask_bit(const uint8_t* mask, int64_t bit) {
  return (mask[bit >> 3] >> (bit & 7)) & 1u;
}

// y[i] = fake_quantize(x[i]) with quantizer row.at(i). When mask is given (pre-zeroed), bit
// mask_bit0 + i is set where x[i] quantizes inside [quant_min, quant_max].
template <typename T>
void fake_quantize_row_ref(const T* x, T* y, int64_t n, const QuantizerRow& row, uint8_t* mask,
                           int64_t mask_bit0) {
  for (int64_t i = 0; i < n; ++i) {
    bool in_range = false;
    y[i] = fake_quantize_value(x[i], row.at(i), &in_range);
    if (mask != nullptr && in_range) set_mask_bit(mask, mask_bit0 + i);
  }
}

// Straight-through backward: dx[i] = mask bit i ? dy[i] : 0.
template <typename T>
void masked_grad_ref(const T* dy, const uint8_t* mask, T* dx, int64_t begin, int64_t end) {
  for (int64_t i = begin; i < end; ++i) dx[i] = mask_bit(mask, i) ? dy[i] : static_cast<T>(0);
}

// Per-element LSQ / LSQ+ gradient terms (before grad_factor), as in torch's learnable kernels:
//   in range:  dx = dy, dscale = dy * (x_fq - x) * inv_scale, dzero_point = 0
//   outside:   dx = 0,  dscale = dy * (clamped_level - zero_point), dzero_point = -dy * scale
template <typename T>
struct LearnableGrad {
  acc_t<T> dx, dscale, dzero_point;
};

template <typename T>
inline LearnableGrad<T> learnable_grad_value(T x, T dy, const AffineQuantizer& q) {
  using A = acc_t<T>;
  const A level = quant_level(x, q);
  const A lo = static_cast<A>(q.quant_min), hi = static_cast<A>(q.quant_max);
  const A zp = static_cast<A>(q.zero_point), scale = static_cast<A>(q.scale);
  const A g = static_cast<A>(dy);
  if (level >= lo && level <= hi) {
    const A x_fq = (level - zp) * scale;
    return {g, g * (x_fq - static_cast<A>(x)) * static_cast<A>(q.inv_scale), A(0)};
  }
  if (level != level) return {A(0), A(0), A(0)};  // NaN input: no gradient flows
  const A clamped = level < lo ? lo : hi;
  return {A(0), g * (clamped - zp), -g * scale};
}

// Fused learnable backward over a row: writes dx and adds the dscale / dzero_point terms to the
// sums of the quantizer each element used: dscale_sum[i * row.step], dzp_sum[i * row.step].
template <typename T>
void learnable_grad_row_ref(const T* x, const T* dy, T* dx, int64_t n, const QuantizerRow& row,
                            double* dscale_sum, double* dzp_sum) {
  for (int64_t i = 0; i < n; ++i) {
    const auto g = learnable_grad_value(x[i], dy[i], row.at(i));
    dx[i] = static_cast<T>(g.dx);
    dscale_sum[i * row.step] += g.dscale;
    dzp_sum[i * row.step] += g.dzero_point;
  }
}

}  // namespace qext::kernels
