// Framework-free quantized elementwise kernels of converted models: the residual add, average
// pooling (plain and adaptive) and max pooling. Integer-only arithmetic; the add and average
// pooling round once (half up), at the end.
//
// Levels: every zero point and clamp bound here is in the uint8 domain [0, 255]. int8 tensors
// (torch.qint8) are handled by XORing their bytes with 0x80 on the way in and out (the `flip`
// arguments): a flipped byte is the level + 128, so the caller adds 128 to the zero points and
// bounds. With a flip of 0 the bytes are uint8 levels as they are.
#pragma once

#include <cstdint>
#include <vector>

#include "qext/kernels/qgemm.h"

namespace qext::kernels {

// ---------------------------------------------------------------------------------------------
// Residual add (Jacob et al. / TFLite): out = clamp(round((qa - za) sa/so + (qb - zb) sb/so) + zo,
// lo, hi), computed in integers with one common fixed-point form of both ratios:
//   a_mult = round(sa/so * 2^shift), b_mult = round(sb/so * 2^shift) (round half away from zero),
//   shift = the largest value <= 62 keeping |a_mult|, |b_mult| < 2^31,
//   v = (qa - za) * a_mult + (qb - zb) * b_mult             (int64, exact)
//   out = clamp(floor((v + 2^(shift - 1)) / 2^shift) + zo, lo, hi)
// The multipliers are within 1/2 of ratio * 2^shift, so out is the correctly rounded (half up) real
// result except within 255 * 2^-shift (about 255 * max(sa, sb) / so * 2^-31) LSB of a tie. One
// shift for both terms keeps the sum exact before its single rounding (rounding each term
// separately would round twice).
// ---------------------------------------------------------------------------------------------
struct AddParams {
  int32_t za, zb, zo, lo, hi;
  int64_t a_mult, b_mult;
  int shift;
};

// Fills *out; false (and *out untouched) when a scale is not finite or <= 0, a ratio sa/so or sb/so
// is outside [2^-32, 2^29], a zero point is outside [0, 255], or not 0 <= lo <= hi <= 255.
// relu raises lo to max(lo, zo) (at most hi: a ReLU whose 0 is above hi gives hi everywhere).
bool make_add_params(double sa, double sb, double so, int32_t za, int32_t zb, int32_t zo,
                     int32_t lo, int32_t hi, bool relu, AddParams* out);

// The formula above for one pair of uint8-domain levels (the scalar reference every path matches).
int32_t add_level(int32_t qa, int32_t qb, const AddParams& p);

// out[i] = add_level(a[i] ^ a_flip, b[i] ^ b_flip, p) ^ out_flip for i < n (a, b and out may
// alias). isa kScalar is the reference; every other ISA runs the AVX2 path (bit-identical).
void add_u8(Isa isa, const uint8_t* a, const uint8_t* b, int64_t n, const AddParams& p,
            uint8_t* out, uint8_t a_flip, uint8_t b_flip, uint8_t out_flip);
// The same with the fastest ISA of this CPU (best_isa()).
void add_u8(const uint8_t* a, const uint8_t* b, int64_t n, const AddParams& p, uint8_t* out,
            uint8_t a_flip, uint8_t b_flip, uint8_t out_flip);

// ---------------------------------------------------------------------------------------------
// Wide fixed-point multiplier: a real m > 0 as mult * 2^-shift with 1 <= shift <= 62 and mult as
// large as allowed by |acc| * mult < 2^62 for the accumulators it is used with, applied with a
// single rounding: requantize_wide(acc) = clamp(floor((acc * mult + 2^(shift - 1)) / 2^shift) + zp,
// lo, hi). Used by average pooling instead of the GEMM's 31-bit FixedPointMultiplier: pooling sums
// are small (a few thousand), and requantize()'s first rounding (of acc * multiplier / 2^31 to an
// integer) then costs up to 2^-(r+1) LSB of the output (1/16 LSB for a 3x3 window), whereas here
// the result is the correctly rounded (half up) real value except within max_abs_acc^2 * m / 2^62
// LSB of a tie (pooling d taps: 1.5e-14 * d * in_scale / out_scale LSB, 7e-10 for a 224x224 plane).
// ---------------------------------------------------------------------------------------------
struct WideMultiplier {
  int64_t mult;
  int shift;
};

// False (and *out untouched) when m is not finite, m < 2^-32, max_abs_acc < 1, or
// m * max_abs_acc >= 2^30 (the result would not fit the int32 levels anyway).
bool make_wide_multiplier(double m, int64_t max_abs_acc, WideMultiplier* out);

// Valid for |acc| <= the max_abs_acc the multiplier was made for.
inline int32_t requantize_wide(int64_t acc, WideMultiplier m, int32_t zero_point, int32_t lo,
                               int32_t hi) {
  const int64_t v = acc * m.mult + (int64_t{1} << (m.shift - 1));
  // Floor division by 2^shift (v >> shift would be the same on every compiler qext supports, but
  // right shifts of negative values are implementation-defined before C++20).
  const int64_t q = (v >= 0 ? v >> m.shift : -((-v - 1) >> m.shift) - 1) + zero_point;
  return static_cast<int32_t>(q < lo ? lo : (q > hi ? hi : q));
}

// ---------------------------------------------------------------------------------------------
// Average pooling of NCHW planes, torch.nn.AvgPool2d / AdaptiveAvgPool2d windows:
//   y = clamp(round_half_up(sum over in-image window taps of (x - in_zero_point) * m(d)) +
//             out_zero_point, out_min, out_max),  m(d) = in_scale / (out_scale * d)
// with d the divisor: divisor_override when > 0; else with count_include_pad the window's size
// clipped to the padded input (torch: min(start + kernel, in + pad) - start per dimension), else
// the number of in-image taps. Padding contributes the real value 0. Adaptive windows (no padding)
// are [floor(i * in / out), ceil((i + 1) * in / out)) and d is their size.
// A plan holds the windows and one WideMultiplier per distinct divisor; it is built once per shape
// and quantization and then run on any number of planes (in parallel: run() is const).
// ---------------------------------------------------------------------------------------------
struct PoolQuant {
  double in_scale;
  int32_t in_zero_point;  // uint8 domain (see the top of this file)
  double out_scale;
  int32_t out_zero_point, out_min, out_max;  // uint8 domain; 0 <= out_min <= out_max <= 255
};

struct AvgPool2dOptions {
  int64_t kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w;
  bool ceil_mode, count_include_pad;
  int64_t divisor_override;  // > 0: divide by this; 0: none
};

// Output length of one dimension like torch's pooling: floor or ceil of
// (in + 2 pad - kernel) / stride, + 1; in ceil mode the last window must start inside the input
// or its left padding. Non-positive when the input is too small. With dilation d, pass the
// dilated kernel d (kernel - 1) + 1.
int64_t pool_output_size(int64_t in, int64_t kernel, int64_t stride, int64_t pad, bool ceil_mode);

struct AvgPool2dPlan {
  int64_t in_h = 0, in_w = 0, out_h = 0, out_w = 0;
  std::vector<int64_t> h_begin,
      h_end;  // [out_h]: window rows [h_begin, h_end), clipped to the image
  std::vector<int64_t> w_begin, w_end;     // [out_w]
  std::vector<int32_t> h_class, w_class;   // divisor class of each window row / column
  int64_t w_classes = 0;                   // number of distinct column classes
  std::vector<WideMultiplier> multiplier;  // [h_class * w_classes + w_class]
  PoolQuant quant{};
};

// False (why set to a static message when given) for non-positive kernel / stride, a negative
// padding or one above half the kernel (torch's rule), an empty output, a negative
// divisor_override, or scales without a WideMultiplier (not finite, <= 0, or out of range).
bool make_avg_pool2d_plan(int64_t in_h, int64_t in_w, const AvgPool2dOptions& options,
                          const PoolQuant& quant, AvgPool2dPlan* plan, const char** why = nullptr);
bool make_adaptive_avg_pool2d_plan(int64_t in_h, int64_t in_w, int64_t out_h, int64_t out_w,
                                   const PoolQuant& quant, AvgPool2dPlan* plan,
                                   const char** why = nullptr);

// `planes` consecutive planes: x holds planes * in_h * in_w bytes, y receives planes * out_h *
// out_w bytes; every byte is XORed with flip on the way in and out (int8 levels: 0x80).
void avg_pool2d_u8(const AvgPool2dPlan& plan, const uint8_t* x, int64_t planes, uint8_t flip,
                   uint8_t* y);

// ---------------------------------------------------------------------------------------------
// Max pooling, torch.nn.MaxPool2d windows (padding, dilation, ceil_mode). Max commutes with the
// affine map, so the output is the largest level of each window with the input's quantization;
// padded taps never win. int8 levels go through the flip (x ^ 0x80 orders signed bytes as
// unsigned ones). A window without any tap in the image (only possible with dilation) gives the
// lowest level, as torch's quantized max_pool2d does.
// ---------------------------------------------------------------------------------------------
struct MaxPool2dOptions {
  int64_t kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w;
  bool ceil_mode;
};

struct MaxPool2dPlan {
  int64_t in_h = 0, in_w = 0, out_h = 0, out_w = 0, dilation_h = 1, dilation_w = 1;
  std::vector<int64_t> h_first, h_taps;  // [out_h]: first in-image window row, in-image rows
  std::vector<int64_t> w_first, w_taps;  // [out_w]: the same for columns
};

// False (why set to a static message naming the argument when given) for empty input planes,
// a kernel_size, stride or dilation <= 0, a negative padding or one above half the kernel_size
// (torch's rule), or an empty output.
bool make_max_pool2d_plan(int64_t in_h, int64_t in_w, const MaxPool2dOptions& options,
                          MaxPool2dPlan* plan, const char** why = nullptr);

// NCHW: `planes` consecutive planes, x holds planes * in_h * in_w bytes, y receives planes *
// out_h * out_w bytes. flip: 0x80 for int8 levels, 0 for uint8 ones (the only two values).
void max_pool2d_u8(const MaxPool2dPlan& plan, const uint8_t* x, int64_t planes, uint8_t flip,
                   uint8_t* y);

// Channels-last (NHWC) images of `channels` bytes per pixel: the output rows [row_begin, row_end)
// of the batch, row r being output row r % out_h of image r / out_h; x and y point at image 0.
void max_pool2d_nhwc_u8(const MaxPool2dPlan& plan, const uint8_t* x, int64_t channels,
                        int64_t row_begin, int64_t row_end, uint8_t flip, uint8_t* y);

// The reference the kernels above match: every window tap of every output, straight from the
// definition, comparing uint8 or (is_signed) int8 values. x: [batch, channels, in_h, in_w] in
// NCHW or (channels_last) NHWC order; y: [batch, channels, out_h, out_w] in the same order.
void max_pool2d_reference(const MaxPool2dOptions& options, int64_t batch, int64_t channels,
                          int64_t in_h, int64_t in_w, int64_t out_h, int64_t out_w,
                          bool channels_last, bool is_signed, const uint8_t* x, uint8_t* y);

// Layout changes of quantized activations (NCHW <-> channels-last): dst (cols x rows, row-major)
// = the transpose of src (rows x cols, row-major), bytes. NCHW to NHWC is one call per image with
// rows = C, cols = H * W; NHWC to NCHW the other way round. 16 x 16 blocks with SSE2 unpacks when
// both sides have 16 or more (torch's own layout copy of quantized tensors moves one byte at a
// time); a plain loop otherwise.
void transpose_u8(const uint8_t* src, int64_t rows, int64_t cols, uint8_t* dst);

}  // namespace qext::kernels
